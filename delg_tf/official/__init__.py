"""delg_tf.official."""
