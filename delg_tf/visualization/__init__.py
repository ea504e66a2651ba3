"""delg_tf.visualization."""
