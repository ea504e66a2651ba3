"""Global pooling of feature maps as small pure functions.

Each takes a feature map [B, H, W, C] and returns [B, C]. References:
SPoC (Babenko & Lempitsky, ICCV 2015), MAC (Tolias et al., ICLR 2016),
GeM (Radenovic et al., TPAMI 2018; DELG uses p=3).
"""

import tensorflow as tf

GEM_DEFAULT_POWER = 3.0
GEM_CLAMP_EPSILON = 1e-6  # Activations are clipped below at this value before x^p.
SPATIAL_AXES = (1, 2)


def spoc(x):
    """Sum-pooling of convolutions, as average pooling: mean over H, W."""
    return tf.reduce_mean(x, axis=SPATIAL_AXES)


def mac(x):
    """Maximum activations of convolutions: max over H, W."""
    return tf.reduce_max(x, axis=SPATIAL_AXES)


def gem(x, power=GEM_DEFAULT_POWER, eps=GEM_CLAMP_EPSILON):
    """Generalised mean pooling: (mean(max(x, eps)^p))^(1/p) over H, W.

    Args:
      x: float tensor [B, H, W, C].
      power: scalar p (a float or a scalar tensor / variable when learned).
      eps: lower clip of the activations.

    Returns:
      float tensor [B, C].
    """
    power = tf.cast(power, x.dtype)
    pooled = tf.reduce_mean(tf.pow(tf.maximum(x, eps), power), axis=SPATIAL_AXES)
    return tf.pow(pooled, 1.0 / power)


POOLING_FUNCTIONS = {"spoc": spoc, "mac": mac, "gem": gem}
