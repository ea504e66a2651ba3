"""ArcFace-adjusted cosine logits and the scaled softmax cross-entropy L_g (DELG eqs. 2-3).

Pure functions. Numerics follow the official TF2 DELG code
(`delf/python/training/model/delg_model.py`): the margin is added to the angle
of the true class only, and only where theta <= pi - m (adding it beyond would
*raise* the cosine). In addition the cosine is clipped to
[-1 + COSINE_CLIP_EPSILON, 1 - COSINE_CLIP_EPSILON] before acos, because the
gradient of acos is infinite at +-1 (the official code does not clip).
"""

import math

import tensorflow as tf

DEFAULT_ARCFACE_MARGIN = 0.1
COSINE_CLIP_EPSILON = 1e-6


def arcface_cosine(cosine, labels, margin=DEFAULT_ARCFACE_MARGIN):
    """AF(u, c): cos(acos(u) + m) for the true class, u for the others (eq. 2).

    Args:
      cosine: float tensor [B, K], cosine similarities u in [-1, 1].
      labels: int tensor [B], true class indices in [0, K).
      margin: ArcFace margin m (radians). m <= 0 returns `cosine` unchanged.

    Returns:
      float tensor [B, K].
    """
    if margin <= 0.0:
        return cosine
    num_classes = tf.shape(cosine)[-1]
    is_true = tf.cast(tf.one_hot(tf.cast(labels, tf.int32), num_classes), tf.bool)
    clipped = tf.clip_by_value(cosine, -1.0 + COSINE_CLIP_EPSILON, 1.0 - COSINE_CLIP_EPSILON)
    theta = tf.acos(clipped)
    apply_margin = tf.logical_and(is_true, theta <= math.pi - margin)
    return tf.where(apply_margin, tf.cos(theta + margin), cosine)


def arcface_logits(cosine, labels, scale, margin=DEFAULT_ARCFACE_MARGIN):
    """Gamma * AF(u, c): the logits of eq. 3. `labels=None` gives gamma * u (no margin)."""
    if labels is not None:
        cosine = arcface_cosine(cosine, labels, margin)
    return tf.cast(scale, cosine.dtype) * cosine


def arcface_loss(cosine, labels, scale, margin=DEFAULT_ARCFACE_MARGIN):
    """Per-example ArcFace loss L_g (eq. 3): softmax CE of gamma * AF(u, c).

    Args:
      cosine: float tensor [B, K], cosine similarities between the L2-normalised
        global descriptor g^ and the L2-normalised class weights w^.
      labels: int tensor [B].
      scale: scalar gamma (float or scalar variable).
      margin: ArcFace margin m.

    Returns:
      float tensor [B] of per-example losses (reduce them with e.g.
      `tf.nn.compute_average_loss`).
    """
    logits = arcface_logits(cosine, labels, scale, margin)
    return tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(labels, tf.int32), logits=logits
    )
