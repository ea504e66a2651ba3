"""delg_tf.ops."""
