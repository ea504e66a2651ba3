"""Cosine classifier with a learnable scale, the ArcFace head of DELG's global loss."""

import math

import keras
import tensorflow as tf

from delg_tf.losses import arcface

DEFAULT_ARCFACE_MARGIN = arcface.DEFAULT_ARCFACE_MARGIN


@keras.saving.register_keras_serializable(package="delg_tf")
class CosineClassifier(keras.layers.Layer):
    """Cosine similarities between L2-normalised embeddings and class weights.

    `call(embeddings)` returns u = g^T w^ [B, K] with both sides L2-normalised,
    without margin or scale. `logits(embeddings, labels)` returns gamma * AF(u, c)
    (eqs. 2-3; the margin only when labels are given). The loss is
    `delg_tf.losses.arcface.arcface_loss(u, labels, layer.scale, layer.margin)`.

    Weights: ``kernel`` [C_F, K] (like the official ``cosine_weights``,
    normalised along C_F) and the scalar ``scale`` gamma, initialised to
    `scale_init` (default sqrt(C_F); 45.25 for C_F = 2048).

    Args:
      num_classes: K.
      scale_init: initial gamma; None means sqrt(input dimension).
      learn_scale: gamma is trainable (paper: "a learnable scalar"; the official
        TF2 code keeps it fixed).
      margin: ArcFace margin m used by `logits` (0.1 in the paper).
      kernel_initializer: initializer of the class weights.

    Input shape: [B, C_F]. Output shape: [B, K].

    Reference: Cao et al., ECCV 2020, Sec. 3.3, eqs. 2-3; Deng et al., "ArcFace",
    CVPR 2019.
    """

    def __init__(
        self,
        num_classes,
        scale_init=None,
        learn_scale=True,
        margin=DEFAULT_ARCFACE_MARGIN,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if int(num_classes) < 1:
            raise ValueError(
                f"CosineClassifier num_classes must be >= 1, received {num_classes!r}."
            )
        self.num_classes = int(num_classes)
        self.scale_init = None if scale_init is None else float(scale_init)
        self.learn_scale = bool(learn_scale)
        self.margin = float(margin)
        self.kernel_initializer = kernel_initializer

    def build(self, input_shape):
        dim = int(input_shape[-1])
        scale_init = math.sqrt(dim) if self.scale_init is None else self.scale_init
        self.kernel = self.add_weight(
            name="kernel",
            shape=(dim, self.num_classes),
            initializer=self.kernel_initializer,
            trainable=True,
        )
        self.scale = self.add_weight(
            name="scale",
            shape=(),
            initializer=keras.initializers.Constant(scale_init),
            trainable=self.learn_scale,
        )
        self.built = True

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes)

    def call(self, embeddings):
        normalized = tf.math.l2_normalize(embeddings, axis=-1)
        weights = tf.math.l2_normalize(tf.convert_to_tensor(self.kernel), axis=0)
        return tf.matmul(normalized, weights)

    def logits(self, embeddings, labels=None):
        """Gamma * AF(u, c) with the margin on the true class, or gamma * u if no labels."""
        return arcface.arcface_logits(
            self(embeddings), labels, tf.convert_to_tensor(self.scale), self.margin
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            scale_init=self.scale_init,
            learn_scale=self.learn_scale,
            margin=self.margin,
            kernel_initializer=keras.initializers.serialize(
                keras.initializers.get(self.kernel_initializer)
            ),
        )
        return config
