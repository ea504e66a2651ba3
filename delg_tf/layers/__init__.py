"""delg_tf.layers."""
