"""DELF/DELG attention network M (keypoint scores from S)."""

import keras
import tensorflow as tf

DEFAULT_HIDDEN_CHANNELS = 512
DEFAULT_KERNEL_SIZE = 1
# keras.layers.BatchNormalization defaults, as the official TF2 attention head uses.
DEFAULT_BN_EPSILON = 1e-3
DEFAULT_BN_MOMENTUM = 0.99
ATTENTION_CHANNELS = 1


@keras.saving.register_keras_serializable(package="delg_tf")
class AttentionHead(keras.layers.Layer):
    """Attention network: 1x1 conv (+ BN) + ReLU, 1x1 conv to 1 channel + Softplus.

    Sublayer names mirror the official TF2 DELF code (``attention/conv1``,
    ``attention/bn_conv1``, ``attention/conv2``) so weights map one to one. The
    official TF2 head has a bias on `conv1` and BN after it; the TF1/slim head
    has BN and no bias (``use_bn=True, conv1_bias=False``).

    Args:
      hidden_channels: channels of the first convolution (512 in the paper).
      kernel_size: kernel size of both convolutions (1 in the paper).
      use_bn: batch norm after the first convolution.
      conv1_bias: bias on the first convolution.
      bn_epsilon: batch-norm epsilon.
      bn_momentum: batch-norm moving-average momentum.
      kernel_initializer: initializer of both kernels.

    Input shape: [B, H, W, C] (S, or S' for the official TF2 head).
    Output of `call`: (attention_prob [B, H, W, 1] = softplus(logits),
    attention_logits [B, H, W, 1]).

    Reference: Cao et al., ECCV 2020, Sec. 3.2 (A = M(S)) and Sec. 4.1; Noh et
    al., "Large-Scale Image Retrieval with Attentive Deep Local Features", ICCV
    2017.
    """

    def __init__(
        self,
        hidden_channels=DEFAULT_HIDDEN_CHANNELS,
        kernel_size=DEFAULT_KERNEL_SIZE,
        use_bn=True,
        conv1_bias=True,
        bn_epsilon=DEFAULT_BN_EPSILON,
        bn_momentum=DEFAULT_BN_MOMENTUM,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.hidden_channels = int(hidden_channels)
        self.kernel_size = int(kernel_size)
        self.use_bn = bool(use_bn)
        self.conv1_bias = bool(conv1_bias)
        self.bn_epsilon = float(bn_epsilon)
        self.bn_momentum = float(bn_momentum)
        self.kernel_initializer = kernel_initializer
        self.conv1 = keras.layers.Conv2D(
            self.hidden_channels,
            self.kernel_size,
            padding="same",
            use_bias=self.conv1_bias,
            kernel_initializer=kernel_initializer,
            name="conv1",
        )
        self.bn_conv1 = (
            keras.layers.BatchNormalization(
                epsilon=self.bn_epsilon, momentum=self.bn_momentum, name="bn_conv1"
            )
            if self.use_bn
            else None
        )
        self.conv2 = keras.layers.Conv2D(
            ATTENTION_CHANNELS,
            self.kernel_size,
            padding="same",
            use_bias=True,
            kernel_initializer=kernel_initializer,
            name="conv2",
        )

    def build(self, input_shape):
        self.conv1.build(input_shape)
        hidden_shape = self.conv1.compute_output_shape(input_shape)
        if self.bn_conv1 is not None:
            self.bn_conv1.build(hidden_shape)
        self.conv2.build(hidden_shape)
        self.built = True

    def compute_output_shape(self, input_shape):
        shape = tuple(input_shape[:-1]) + (ATTENTION_CHANNELS,)
        return shape, shape

    def call(self, x, training=False):
        x = self.conv1(x)
        if self.bn_conv1 is not None:
            x = self.bn_conv1(x, training=training)
        x = tf.nn.relu(x)
        logits = self.conv2(x)
        return tf.nn.softplus(logits), logits

    def get_config(self):
        config = super().get_config()
        config.update(
            hidden_channels=self.hidden_channels,
            kernel_size=self.kernel_size,
            use_bn=self.use_bn,
            conv1_bias=self.conv1_bias,
            bn_epsilon=self.bn_epsilon,
            bn_momentum=self.bn_momentum,
            kernel_initializer=keras.initializers.serialize(
                keras.initializers.get(self.kernel_initializer)
            ),
        )
        return config
