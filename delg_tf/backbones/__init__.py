"""delg_tf.backbones."""
