"""Multi-atrous convolution block of the DOLG local branch."""

import keras
import tensorflow as tf

# Rates of public DOLG re-implementations; (6, 12, 18) is the other common choice.
DOLG_ATROUS_RATES = (3, 6, 9)
ATROUS_KERNEL_SIZE = 3
NUM_GAP_BRANCHES = 1
SPATIAL_AXES = (1, 2)


class MultiAtrous(keras.layers.Layer):
    """Parallel dilated 3x3 convolutions plus a global-average-pooling branch.

    Each rate r gives a 3x3 convolution with dilation r ('same' padding, so the
    spatial size is kept); the global branch averages the map over H, W, applies a
    1x1 convolution (a dense layer) and ReLU and is broadcast back to H x W. The
    `len(rates) + 1` branch outputs are concatenated and projected by a 1x1
    convolution + ReLU.

    Args:
      filters: output channels of the projection.
      rates: dilation rates of the 3x3 convolutions, e.g. (3, 6, 9) or (6, 12, 18).
      branch_filters: channels of each branch; default `filters // (len(rates) + 1)`
        (so the concatenation has about `filters` channels, as in public DOLG code).
      kernel_initializer: initializer of all convolution kernels.

    Input shape: [B, H, W, C_in]. Output shape: [B, H, W, filters].

    Reference: Yang et al., "DOLG: Single-Stage Image Retrieval with Deep Orthogonal
    Fusion of Local and Global Features", ICCV 2021, Sec. 3.2 (local branch); used by
    the Glocal Retriever (Kim, Kim, Suh, Electronics 2023, Sec. 3.3).
    """

    def __init__(
        self,
        filters,
        rates=DOLG_ATROUS_RATES,
        branch_filters=None,
        kernel_initializer="he_normal",
        **kwargs,
    ):
        super().__init__(**kwargs)
        rates = tuple(int(r) for r in rates)
        if not rates or min(rates) < 1 or len(set(rates)) != len(rates):
            raise ValueError(
                f"MultiAtrous rates must be distinct positive integers such as "
                f"(3, 6, 9), received {rates!r}."
            )
        if filters < 1:
            raise ValueError(f"MultiAtrous filters must be >= 1, received {filters!r}.")
        self.filters = int(filters)
        self.rates = rates
        self.branch_filters = (
            int(branch_filters)
            if branch_filters
            else max(1, self.filters // (len(rates) + NUM_GAP_BRANCHES))
        )
        self.kernel_initializer = kernel_initializer
        # One attribute per branch (not a list): Keras 3 lists of layers are not
        # tf.train.Checkpoint dependencies.
        for rate in rates:
            setattr(
                self,
                f"atrous_rate{rate}",
                keras.layers.Conv2D(
                    self.branch_filters,
                    ATROUS_KERNEL_SIZE,
                    dilation_rate=rate,
                    padding="same",
                    kernel_initializer=kernel_initializer,
                    name=f"atrous_rate{rate}",
                ),
            )
        self.gap_conv = keras.layers.Dense(
            self.branch_filters,
            activation="relu",
            kernel_initializer=kernel_initializer,
            name="gap_conv",
        )
        self.projection = keras.layers.Conv2D(
            self.filters,
            1,
            activation="relu",
            kernel_initializer=kernel_initializer,
            name="projection",
        )

    @property
    def atrous_convs(self):
        """The dilated convolutions, in the order of `rates`."""
        return [getattr(self, f"atrous_rate{rate}") for rate in self.rates]

    def build(self, input_shape):
        for conv in self.atrous_convs:
            conv.build(input_shape)
        self.gap_conv.build((input_shape[0], input_shape[-1]))
        concat_channels = self.branch_filters * (len(self.rates) + NUM_GAP_BRANCHES)
        self.projection.build(tuple(input_shape[:-1]) + (concat_channels,))
        self.built = True

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.filters,)

    def call(self, x):
        branches = [conv(x) for conv in self.atrous_convs]
        pooled = self.gap_conv(tf.reduce_mean(x, axis=SPATIAL_AXES))  # [B, branch]
        shape = tf.shape(x)
        branches.append(
            tf.broadcast_to(
                pooled[:, None, None, :], [shape[0], shape[1], shape[2], self.branch_filters]
            )
        )
        return self.projection(tf.concat(branches, axis=-1))

    def get_config(self):
        config = super().get_config()
        config.update(
            filters=self.filters,
            rates=list(self.rates),
            branch_filters=self.branch_filters,
            kernel_initializer=keras.initializers.serialize(
                keras.initializers.get(self.kernel_initializer)
            ),
        )
        return config
