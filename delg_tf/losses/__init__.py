"""delg_tf.losses."""
