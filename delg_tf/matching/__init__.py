"""delg_tf.matching."""
