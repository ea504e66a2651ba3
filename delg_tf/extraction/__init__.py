"""delg_tf.extraction."""
