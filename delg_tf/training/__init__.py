"""delg_tf.training."""
