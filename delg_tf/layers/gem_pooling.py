"""Generalised-mean (GeM) pooling layer with a fixed or learnable power."""

import keras
import tensorflow as tf

from delg_tf.ops import pooling

DEFAULT_GEM_POWER = pooling.GEM_DEFAULT_POWER
DEFAULT_GEM_EPSILON = pooling.GEM_CLAMP_EPSILON


@keras.saving.register_keras_serializable(package="delg_tf")
class GeMPooling(keras.layers.Layer):
    """GeM pooling of a feature map: (mean_{h,w} max(d, eps)^p)^(1/p).

    The pooling of the DELG global head (paper eq. 1, without F and b_F). The
    power p is a scalar weight named ``power``; it is trainable only when
    `learn_power` is True (the paper keeps p = 3 fixed, Sec. 4.1).

    Args:
      power: initial (or fixed) GeM power p.
      learn_power: make p a trainable weight.
      eps: activations are clipped below at `eps` before the power.

    Input shape: [B, H, W, C]. Output shape: [B, C].

    Reference: Radenovic et al., "Fine-tuning CNN Image Retrieval with No Human
    Annotation", TPAMI 2018; Cao et al., "Unifying Deep Local and Global Features
    for Image Search", ECCV 2020, eq. 1.
    """

    def __init__(
        self, power=DEFAULT_GEM_POWER, learn_power=False, eps=DEFAULT_GEM_EPSILON, **kwargs
    ):
        super().__init__(**kwargs)
        if power <= 0:
            raise ValueError(f"GeMPooling power must be > 0, received {power!r}.")
        self.power_init = float(power)
        self.learn_power = bool(learn_power)
        self.eps = float(eps)

    def build(self, input_shape):
        self.power = self.add_weight(
            name="power",
            shape=(),
            initializer=keras.initializers.Constant(self.power_init),
            trainable=self.learn_power,
        )
        self.built = True

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def call(self, x):
        return pooling.gem(x, power=tf.convert_to_tensor(self.power), eps=self.eps)

    def get_config(self):
        config = super().get_config()
        config.update(power=self.power_init, learn_power=self.learn_power, eps=self.eps)
        return config
