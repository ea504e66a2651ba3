"""DELG local-descriptor autoencoder: T (1x1 conv to C_T) and T' (back to C_S + ReLU)."""

import keras
import tensorflow as tf

DEFAULT_LOCAL_DIM = 128
DEFAULT_KERNEL_SIZE = 1


@keras.saving.register_keras_serializable(package="delg_tf")
class Autoencoder(keras.layers.Layer):
    """Convolutional autoencoder of the shallow feature map S.

    ``conv1`` is T (the encoder, with bias, no activation): its output L is the
    local descriptor map. ``conv2`` is T' (the decoder, with bias, then ReLU):
    its output S' reconstructs S. Names mirror the official TF2 code
    (``autoencoder/conv1``, ``autoencoder/conv2``).

    Args:
      local_dim: C_T, channels of the local descriptors (128 in the paper).
      output_dim: C_S, channels of S to reconstruct (1024 for ResNet-50/101).
      kernel_size: kernel size of both convolutions (1 in the paper).
      kernel_initializer: initializer of both kernels.

    Input shape: [B, H, W, C_S].
    Output of `call`: (descriptors L [B, H, W, C_T], reconstruction S'
    [B, H, W, C_S]).

    Reference: Cao et al., ECCV 2020, Sec. 3.2 (L = T(S)) and Sec. 3.3 (S' = T'(L)).
    """

    def __init__(
        self,
        local_dim=DEFAULT_LOCAL_DIM,
        output_dim=1024,
        kernel_size=DEFAULT_KERNEL_SIZE,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.local_dim = int(local_dim)
        self.output_dim = int(output_dim)
        self.kernel_size = int(kernel_size)
        self.kernel_initializer = kernel_initializer
        self.conv1 = keras.layers.Conv2D(
            self.local_dim,
            self.kernel_size,
            padding="same",
            use_bias=True,
            kernel_initializer=kernel_initializer,
            name="conv1",
        )
        self.conv2 = keras.layers.Conv2D(
            self.output_dim,
            self.kernel_size,
            padding="same",
            use_bias=True,
            kernel_initializer=kernel_initializer,
            name="conv2",
        )

    def build(self, input_shape):
        self.conv1.build(input_shape)
        self.conv2.build(self.conv1.compute_output_shape(input_shape))
        self.built = True

    def compute_output_shape(self, input_shape):
        prefix = tuple(input_shape[:-1])
        return prefix + (self.local_dim,), prefix + (self.output_dim,)

    def encode(self, s):
        """T: S [B, H, W, C_S] -> local descriptors L [B, H, W, C_T] (unnormalised)."""
        return self.conv1(s)

    def decode(self, descriptors):
        """T': L [B, H, W, C_T] -> reconstruction S' [B, H, W, C_S] (after ReLU)."""
        return tf.nn.relu(self.conv2(descriptors))

    def call(self, s):
        descriptors = self.encode(s)
        return descriptors, self.decode(descriptors)

    def get_config(self):
        config = super().get_config()
        config.update(
            local_dim=self.local_dim,
            output_dim=self.output_dim,
            kernel_size=self.kernel_size,
            kernel_initializer=keras.initializers.serialize(
                keras.initializers.get(self.kernel_initializer)
            ),
        )
        return config
