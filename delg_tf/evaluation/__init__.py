"""delg_tf.evaluation."""
