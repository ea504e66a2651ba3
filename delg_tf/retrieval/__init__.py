"""delg_tf.retrieval."""
