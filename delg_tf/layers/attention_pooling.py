"""Attention-weighted pooling of a feature map (DELG eq. 5)."""

import keras
import tensorflow as tf

ATTENTION_POOL_REDUCTIONS = ("sum", "mean")
SPATIAL_AXES = (1, 2)


def attention_pool(features, attention, reduction="sum", normalize=False):
    """Pools features weighted by attention: a' = sum_{h,w} a_{h,w} s'_{h,w}.

    Args:
      features: float tensor [B, H, W, C] (DELG: the reconstruction S').
      attention: float tensor [B, H, W, 1] (attention probabilities a).
      reduction: "sum" (paper eq. 5) or "mean" (the official TF2 DELF/DELG code
        averages over H, W instead of summing).
      normalize: L2-normalise each feature vector along C before pooling (the
        official TF2 code does this).

    Returns:
      float tensor [B, C].
    """
    if reduction not in ATTENTION_POOL_REDUCTIONS:
        raise ValueError(
            f"attention pooling reduction must be one of "
            f"{ATTENTION_POOL_REDUCTIONS}, received {reduction!r}."
        )
    if normalize:
        features = tf.math.l2_normalize(features, axis=-1)
    weighted = features * attention
    if reduction == "sum":
        return tf.reduce_sum(weighted, axis=SPATIAL_AXES)
    return tf.reduce_mean(weighted, axis=SPATIAL_AXES)


@keras.saving.register_keras_serializable(package="delg_tf")
class AttentionPooling(keras.layers.Layer):
    """Attention pooling a' = sum_{h,w} a_{h,w} s'_{h,w} (DELG eq. 5).

    Weightless wrapper of `attention_pool`.

    Args:
      reduction: "sum" (paper) or "mean" (official TF2 code).
      normalize: L2-normalise features along channels before pooling.

    Input: `call(features, attention)` with features [B, H, W, C] and attention
    [B, H, W, 1]. Output shape: [B, C].

    Reference: Cao et al., ECCV 2020, Sec. 3.3, eq. 5; Noh et al., "Large-Scale
    Image Retrieval with Attentive Deep Local Features", ICCV 2017.
    """

    def __init__(self, reduction="sum", normalize=False, **kwargs):
        super().__init__(**kwargs)
        if reduction not in ATTENTION_POOL_REDUCTIONS:
            raise ValueError(
                f"AttentionPooling reduction must be one of "
                f"{ATTENTION_POOL_REDUCTIONS}, received {reduction!r}."
            )
        self.reduction = reduction
        self.normalize = bool(normalize)

    def build(self, features_shape, attention_shape=None):
        self.built = True

    def compute_output_shape(self, features_shape, attention_shape=None):
        return (features_shape[0], features_shape[-1])

    def call(self, features, attention):
        return attention_pool(
            features, attention, reduction=self.reduction, normalize=self.normalize
        )

    def get_config(self):
        config = super().get_config()
        config.update(reduction=self.reduction, normalize=self.normalize)
        return config
