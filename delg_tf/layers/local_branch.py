"""DOLG local branch: multi-atrous block and a Softplus spatial attention."""

import keras
import tensorflow as tf

from delg_tf.layers.multi_atrous import DOLG_ATROUS_RATES, MultiAtrous

ATTENTION_CHANNELS = 1
L2_EPSILON = 1e-12


class LocalBranch(keras.layers.Layer):
    """Attention-weighted, L2-normalised local features of a feature map.

    x -> MultiAtrous(hidden) -> 1x1 conv -> BN = f; the attention is
    softplus(1x1 conv(ReLU(f))) (one channel); the output is
    l2_normalize(f, channels) * attention. (The "conv-BN-ReLU-conv" + Softplus
    attention of DOLG.)

    Args:
      filters: channels of the local features (must equal the dimension of the
        global descriptor they are fused with).
      rates: dilation rates of the multi-atrous block.
      hidden_filters: output channels of the multi-atrous block (default `filters`).
      bn_momentum: batch-norm momentum.
      kernel_initializer: initializer of the convolution kernels.

    Input shape: [B, H, W, C_in].
    Output of `call`: (features [B, H, W, filters], attention [B, H, W, 1]).

    Reference: Yang et al., DOLG, ICCV 2021, Sec. 3.2 and Fig. 2; Kim, Kim, Suh,
    "Glocal Retriever", Electronics 2023, Sec. 3.3.
    """

    def __init__(
        self,
        filters,
        rates=DOLG_ATROUS_RATES,
        hidden_filters=None,
        bn_momentum=0.99,
        kernel_initializer="he_normal",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.rates = tuple(int(r) for r in rates)
        self.hidden_filters = int(hidden_filters) if hidden_filters else self.filters
        self.bn_momentum = float(bn_momentum)
        self.kernel_initializer = kernel_initializer
        self.multi_atrous = MultiAtrous(
            self.hidden_filters,
            rates=self.rates,
            kernel_initializer=kernel_initializer,
            name="multi_atrous",
        )
        self.feature_conv = keras.layers.Conv2D(
            self.filters,
            1,
            use_bias=False,
            kernel_initializer=kernel_initializer,
            name="feature_conv",
        )
        self.feature_bn = keras.layers.BatchNormalization(
            momentum=self.bn_momentum, name="feature_bn"
        )
        self.attention_conv = keras.layers.Conv2D(
            ATTENTION_CHANNELS, 1, kernel_initializer=kernel_initializer, name="attention_conv"
        )

    def build(self, input_shape):
        self.multi_atrous.build(input_shape)
        hidden_shape = self.multi_atrous.compute_output_shape(input_shape)
        self.feature_conv.build(hidden_shape)
        feature_shape = tuple(input_shape[:-1]) + (self.filters,)
        self.feature_bn.build(feature_shape)
        self.attention_conv.build(feature_shape)
        self.built = True

    def call(self, x, training=False):
        features = self.feature_bn(self.feature_conv(self.multi_atrous(x)), training=training)
        attention = tf.nn.softplus(self.attention_conv(tf.nn.relu(features)))
        normalized = tf.math.l2_normalize(features, axis=-1, epsilon=L2_EPSILON)
        return normalized * attention, attention

    def get_config(self):
        config = super().get_config()
        config.update(
            filters=self.filters,
            rates=list(self.rates),
            hidden_filters=self.hidden_filters,
            bn_momentum=self.bn_momentum,
            kernel_initializer=keras.initializers.serialize(
                keras.initializers.get(self.kernel_initializer)
            ),
        )
        return config
