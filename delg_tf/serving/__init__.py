"""delg_tf.serving: SavedModel export modules and signatures for TF Serving."""
