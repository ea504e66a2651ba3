"""Attention loss L_a (DELG eq. 6): softmax cross-entropy of the attention classifier."""

import tensorflow as tf


def attention_loss(logits, labels):
    """Per-example L_a = -log softmax(V a' + b)_k.

    Args:
      logits: float tensor [B, K], the output v_n^T a' + b_n of the attention
        classifier (a Dense layer with bias) on the attention-pooled features a'.
      labels: int tensor [B], true class indices k.

    Returns:
      float tensor [B].
    """
    return tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(labels, tf.int32), logits=logits
    )
