"""delg_tf.export."""
