"""delg_tf.data."""
