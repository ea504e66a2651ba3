"""delg_tf.models."""
