"""DOLG orthogonal fusion of local features with a global descriptor."""

import keras
import tensorflow as tf

from delg_tf.ops import pooling

NORM_EPSILON = 1e-12  # Added to |f_g|^2 so a zero global descriptor does not divide by 0.
ORTHOGONAL_POOLINGS = ("spoc", "mac", "gem")


def orthogonal_component(local_features, global_descriptor, eps=NORM_EPSILON):
    """Removes from every local vector its projection on the global descriptor.

    f_orth(h, w) = f_l(h, w) - (f_l(h, w) . f_g) / |f_g|^2 * f_g

    Args:
      local_features: float [B, H, W, C].
      global_descriptor: float [B, C].
      eps: added to |f_g|^2.

    Returns:
      float [B, H, W, C], orthogonal to f_g at every position.
    """
    g = global_descriptor[:, None, None, :]
    dot = tf.reduce_sum(local_features * g, axis=-1, keepdims=True)  # [B, H, W, 1]
    squared_norm = tf.reduce_sum(tf.square(g), axis=-1, keepdims=True) + eps
    return local_features - dot / squared_norm * g


def orthogonal_fusion(local_features, global_descriptor, pooling_name="spoc", eps=NORM_EPSILON):
    """DOLG fusion: concat(f_g, pool(orthogonal part of f_l)) -> [B, 2C]."""
    orth = orthogonal_component(local_features, global_descriptor, eps=eps)
    return tf.concat([global_descriptor, pooling.POOLING_FUNCTIONS[pooling_name](orth)], axis=-1)


class OrthogonalFusion(keras.layers.Layer):
    """Orthogonal fusion module (OFM) of DOLG.

    For a global descriptor f_g and local features f_l, each local vector is split
    into its projection on f_g and the orthogonal remainder; the remainder is pooled
    over H, W (average pooling in DOLG) and concatenated after f_g. No weights.

    Args:
      pooling: pooling of the orthogonal component, "spoc" (average, DOLG), "mac"
        or "gem".

    Inputs of `call`: local_features [B, H, W, C], global_descriptor [B, C].
    Output shape: [B, 2C] = concat(f_g, pooled orthogonal component).

    Reference: Yang et al., DOLG, ICCV 2021, Sec. 3.3, Eq. 3; Kim, Kim, Suh,
    "Glocal Retriever", Electronics 2023, Sec. 3.4.
    """

    def __init__(self, pooling="spoc", **kwargs):
        super().__init__(**kwargs)
        if pooling not in ORTHOGONAL_POOLINGS:
            raise ValueError(
                f"OrthogonalFusion pooling must be one of {ORTHOGONAL_POOLINGS}, "
                f"received {pooling!r}."
            )
        self.pooling = pooling

    def build(self, local_features_shape, global_descriptor_shape=None):
        self.built = True

    def compute_output_shape(self, local_features_shape, global_descriptor_shape=None):
        return (local_features_shape[0], 2 * local_features_shape[-1])

    def call(self, local_features, global_descriptor):
        if (
            local_features.shape[-1] is not None
            and global_descriptor.shape[-1] is not None
            and local_features.shape[-1] != global_descriptor.shape[-1]
        ):
            raise ValueError(
                f"OrthogonalFusion needs local features and global descriptor of the same "
                f"dimension, received {local_features.shape[-1]} and "
                f"{global_descriptor.shape[-1]}; project the global descriptor to the local "
                f"channel count first."
            )
        return orthogonal_fusion(local_features, global_descriptor, self.pooling)

    def get_config(self):
        config = super().get_config()
        config.update(pooling=self.pooling)
        return config
