"""ResNet-50/101 v1 backbones exposing the DELG feature maps S (conv4) and D (conv5).

Three layouts of the same network are supported, because DELG weights exist in
all of them and they do *not* compute the same function with the same weights
(see ../shared/parity/tf1_slim/README.md, "tf-slim specifics"):

* ``"slim"`` -- tf-slim ``resnet_v1_50/101``, the layout of the DELG paper
  (Sec. 4.1: "the Slim implementation moves the conv5 stride into the last unit
  of conv4") and of the released TF1 DELG models. The stride of each of
  conv2..conv4 sits in the 3x3 conv of the *last* unit of that stage; stride-2
  convolutions pad explicitly and symmetrically (``conv2d_same``); ``pool1`` is
  a 3x3/2 SAME max-pool; convolutions before batch norm have no bias; batch-norm
  epsilon 1e-5.
* ``"tf2_delf"`` -- the Keras ResNet50 of the official TF2 DELF/DELG code
  (``delf/python/training/model/resnet50.py``): stride in the first 1x1 conv of
  the first unit of each stage, biased convolutions, Keras 'same' padding for
  conv1, a 3x3/2 VALID max-pool, batch-norm epsilon 1e-3, and with
  ``block3_stride`` a 1x1/2 max-pool after conv4.
* ``"keras"`` -- ``keras.applications.ResNet50/101`` (ImageNet weights):
  like ``tf2_delf`` but with explicit symmetric padding of conv1, a zero-padded
  VALID max-pool and batch-norm epsilon 1.001e-5.

Layer names follow ``keras.applications`` (``conv1_conv``, ``conv4_block6_2_bn``,
``conv2_block1_0_conv`` for the projection shortcut) in every layout, so weight
mappings (slim names, TF2 DELF names, Keras ImageNet weights) are plain
functions of (stage, unit, conv index); see ``delg_tf.backbones.naming``.

Reference: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016;
Cao, Araujo, Sim, "Unifying Deep Local and Global Features for Image Search",
ECCV 2020, Sec. 4.1.
"""

import dataclasses

import keras
import tensorflow as tf

LAYOUTS = ("slim", "tf2_delf", "keras")

# Units per stage (conv2..conv5) of the standard depths.
UNITS_PER_STAGE = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
}
BOTTLENECK_EXPANSION = 4
DEFAULT_BASE_WIDTH = 64
STEM_KERNEL_SIZE = 7
POOL1_SIZE = 3
STAGE_NAMES = ("conv2", "conv3", "conv4", "conv5")
# Output names of ResNet.call(); "conv4" is DELG's S, "conv5" is D.
FEATURE_NAMES = ("conv1", "conv2", "conv3", "conv4", "conv5")


@dataclasses.dataclass(frozen=True)
class LayoutNumerics:
    """The numerical conventions that distinguish the layouts."""

    stride_in_last_unit: bool
    conv_bias: bool
    bn_epsilon: float
    bn_momentum: float
    stem_padding: str  # ConvBN padding of the 7x7/2 stem: "symmetric" or "same".
    pool1: str  # "same", "valid" or "pad_valid" (ZeroPadding2D(1) then VALID).


LAYOUT_NUMERICS = {
    "slim": LayoutNumerics(
        stride_in_last_unit=True,
        conv_bias=False,
        bn_epsilon=1e-5,
        bn_momentum=0.997,
        stem_padding="symmetric",
        pool1="same",
    ),
    "tf2_delf": LayoutNumerics(
        stride_in_last_unit=False,
        conv_bias=True,
        bn_epsilon=1e-3,
        bn_momentum=0.99,
        stem_padding="same",
        pool1="valid",
    ),
    "keras": LayoutNumerics(
        stride_in_last_unit=False,
        conv_bias=True,
        bn_epsilon=1.001e-5,
        bn_momentum=0.99,
        stem_padding="symmetric",
        pool1="pad_valid",
    ),
}


def symmetric_padding(kernel_size):
    """Padding of tf-slim's ``conv2d_same``: ((k-1)//2 before, the rest after)."""
    before = (kernel_size - 1) // 2
    after = kernel_size - 1 - before
    return ((before, after), (before, after))


class ConvBN(keras.layers.Layer):
    """Convolution + batch norm (+ optional ReLU) with a selectable padding rule.

    Padding "symmetric" is tf-slim's ``conv2d_same``: for stride 1 it is 'same'
    (symmetric for odd kernels); for stride > 1 the input is padded explicitly,
    (k-1)//2 before and the rest after, then convolved VALID. Padding "same" is
    Keras 'same', which for stride > 1 pads less before than after on even
    inputs (the TF2 DELF stem).

    Args:
      filters: output channels.
      kernel_size: square kernel size.
      strides: stride of the convolution.
      padding: "symmetric" or "same".
      use_bias: whether the convolution has a bias (slim: no, Keras: yes).
      bn_epsilon: batch-norm epsilon.
      bn_momentum: batch-norm moving-average momentum.
      activation: apply ReLU after batch norm.
      kernel_initializer: initializer of the convolution kernel.

    Input shape: [B, H, W, C_in]. Output shape: [B, ceil(H/s), ceil(W/s), filters].
    """

    def __init__(
        self,
        filters,
        kernel_size,
        strides=1,
        padding="symmetric",
        use_bias=False,
        bn_epsilon=1e-5,
        bn_momentum=0.997,
        activation=True,
        kernel_initializer="he_normal",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if padding not in ("symmetric", "same"):
            raise ValueError(f"padding must be 'symmetric' or 'same', received {padding!r}.")
        self.filters = filters
        self.kernel_size = kernel_size
        self.strides = strides
        self.padding = padding
        self.use_bias = use_bias
        self.bn_epsilon = bn_epsilon
        self.bn_momentum = bn_momentum
        self.activation = activation
        self.kernel_initializer = kernel_initializer
        pad_explicitly = strides > 1 and padding == "symmetric"
        self.pad = (
            keras.layers.ZeroPadding2D(symmetric_padding(kernel_size), name="pad")
            if pad_explicitly
            else None
        )
        self.conv = keras.layers.Conv2D(
            filters,
            kernel_size,
            strides=strides,
            padding="valid" if pad_explicitly else "same",
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            name="conv",
        )
        self.bn = keras.layers.BatchNormalization(
            epsilon=bn_epsilon, momentum=bn_momentum, name="bn"
        )

    def build(self, input_shape):
        shape = input_shape
        if self.pad is not None:
            self.pad.build(shape)
            shape = self.pad.compute_output_shape(shape)
        self.conv.build(shape)
        self.bn.build(self.conv.compute_output_shape(shape))
        self.built = True

    def compute_output_shape(self, input_shape):
        b, h, w, _ = input_shape
        ceil = lambda n: None if n is None else -(-n // self.strides)  # noqa: E731
        return (b, ceil(h), ceil(w), self.filters)

    def call(self, x, training=False):
        if self.pad is not None:
            x = self.pad(x)
        x = self.bn(self.conv(x), training=training)
        return tf.nn.relu(x) if self.activation else x

    def get_config(self):
        config = super().get_config()
        config.update(
            filters=self.filters,
            kernel_size=self.kernel_size,
            strides=self.strides,
            padding=self.padding,
            use_bias=self.use_bias,
            bn_epsilon=self.bn_epsilon,
            bn_momentum=self.bn_momentum,
            activation=self.activation,
            kernel_initializer=self.kernel_initializer,
        )
        return config


class Bottleneck(keras.layers.Layer):
    """ResNet v1 bottleneck unit (1x1 -> 3x3 -> 1x1, residual, ReLU).

    Args:
      width: channels of the 1x1 and 3x3 convolutions ("depth_bottleneck").
      strides: stride of the unit.
      stride_in_3x3: put the stride on the 3x3 conv (slim) instead of the first
        1x1 conv (Keras).
      projection: use a 1x1 projection shortcut (first unit of a stage).
      numerics: a `LayoutNumerics`.

    Input shape: [B, H, W, C_in]. Output shape: [B, H/s, W/s, 4 * width].
    """

    def __init__(
        self,
        width,
        strides=1,
        stride_in_3x3=True,
        projection=False,
        numerics=LAYOUT_NUMERICS["slim"],
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.width = width
        self.strides = strides
        self.stride_in_3x3 = stride_in_3x3
        self.projection = projection
        self.numerics = numerics
        out = width * BOTTLENECK_EXPANSION
        common = dict(
            use_bias=numerics.conv_bias,
            bn_epsilon=numerics.bn_epsilon,
            bn_momentum=numerics.bn_momentum,
        )
        s1, s3 = (1, strides) if stride_in_3x3 else (strides, 1)
        self.conv_1 = ConvBN(width, 1, strides=s1, name="1", **common)
        self.conv_2 = ConvBN(width, 3, strides=s3, name="2", **common)
        self.conv_3 = ConvBN(out, 1, activation=False, name="3", **common)
        self.shortcut = (
            ConvBN(out, 1, strides=strides, activation=False, name="0", **common)
            if projection
            else None
        )

    def build(self, input_shape):
        self.conv_1.build(input_shape)
        shape = self.conv_1.compute_output_shape(input_shape)
        self.conv_2.build(shape)
        shape = self.conv_2.compute_output_shape(shape)
        self.conv_3.build(shape)
        if self.shortcut is not None:
            self.shortcut.build(input_shape)
        self.built = True

    def compute_output_shape(self, input_shape):
        b, h, w, _ = input_shape
        ceil = lambda n: None if n is None else -(-n // self.strides)  # noqa: E731
        return (b, ceil(h), ceil(w), self.width * BOTTLENECK_EXPANSION)

    def call(self, x, training=False, activation=tf.nn.relu):
        """shortcut(x) + F(x), then `activation` (the unit's ReLU; an inference-time
        replacement such as SuperGlobal's ReLU+, `delg_tf.ops.pooling.relu_plus`).
        """
        if self.shortcut is not None:
            shortcut = self.shortcut(x, training=training)
        elif self.strides > 1:
            # slim's subsample(): a 1x1 max-pool with stride, i.e. x[:, ::s, ::s].
            shortcut = x[:, :: self.strides, :: self.strides, :]
        else:
            shortcut = x
        y = self.conv_1(x, training=training)
        y = self.conv_2(y, training=training)
        y = self.conv_3(y, training=training)
        return activation(shortcut + y)

    def get_config(self):
        config = super().get_config()
        config.update(
            width=self.width,
            strides=self.strides,
            stride_in_3x3=self.stride_in_3x3,
            projection=self.projection,
        )
        return config


class ResNet(keras.Model):
    """ResNet v1 backbone returning the conv1..conv5 feature maps.

    Args:
      depth: 50 or 101 (ignored when `units` is given).
      layout: "slim" (default, the DELG paper's), "tf2_delf" or "keras".
      base_width: bottleneck width of conv2 (64 for the real networks; smaller
        values give fast test networks). S has 16 * base_width channels and D
        32 * base_width.
      units: optional 4-tuple of units per stage overriding `depth`.
      block3_stride: give conv4 (S) and conv5 (D) stride 32 as in DELG (slim: the
        stride of conv4's last unit; Keras layouts: a 1x1/2 max-pool after conv4
        and no stride in conv5). If False, S has stride 16.
      bn_epsilon: override the layout's batch-norm epsilon.

    Input: float images [B, H, W, 3], already normalised (see
    `delg_tf.ops.image.normalize_images`).
    Output of `call`: dict with "conv1" .. "conv5"; "conv4" is S [B, H/32, W/32,
    16*base_width] and "conv5" is D [B, H/32, W/32, 32*base_width] (with
    `block3_stride`; sizes rounded up).
    """

    def __init__(
        self,
        depth=50,
        layout="slim",
        base_width=DEFAULT_BASE_WIDTH,
        units=None,
        block3_stride=True,
        bn_epsilon=None,
        **kwargs,
    ):
        kwargs.setdefault("name", "resnet")
        super().__init__(**kwargs)
        if layout not in LAYOUTS:
            raise ValueError(f"ResNet layout must be one of {LAYOUTS}, received {layout!r}.")
        if units is None:
            if depth not in UNITS_PER_STAGE:
                raise ValueError(
                    f"ResNet depth must be one of {sorted(UNITS_PER_STAGE)} "
                    f"(or pass `units`), received {depth!r}."
                )
            units = UNITS_PER_STAGE[depth]
        units = tuple(int(u) for u in units)
        if len(units) != 4 or min(units) < 1:
            raise ValueError(f"`units` must be 4 positive integers, received {units!r}.")
        self.depth = depth
        self.layout = layout
        self.base_width = base_width
        self.units = units
        self.block3_stride = block3_stride
        self.bn_epsilon = bn_epsilon
        numerics = LAYOUT_NUMERICS[layout]
        if bn_epsilon is not None:
            numerics = dataclasses.replace(numerics, bn_epsilon=bn_epsilon)
        self.numerics = numerics

        self.stem = ConvBN(
            base_width,
            STEM_KERNEL_SIZE,
            strides=2,
            padding=numerics.stem_padding,
            use_bias=numerics.conv_bias,
            bn_epsilon=numerics.bn_epsilon,
            bn_momentum=numerics.bn_momentum,
            name="conv1",
        )
        self.pool1_pad = (
            keras.layers.ZeroPadding2D(1, name="pool1_pad")
            if numerics.pool1 == "pad_valid"
            else None
        )
        self.pool1 = keras.layers.MaxPooling2D(
            POOL1_SIZE,
            strides=2,
            padding="same" if numerics.pool1 == "same" else "valid",
            name="pool1_pool",
        )

        stage_strides = [2, 2, 2 if block3_stride else 1, 1]
        if not numerics.stride_in_last_unit:
            # Keras layouts: stride at the first unit of the *next* stage.
            stage_strides = [1, 2, 2, 1 if block3_stride else 2]
        self.stages = []
        for stage_index, (name, num_units) in enumerate(zip(STAGE_NAMES, units)):
            width = base_width * 2**stage_index
            blocks = []
            for unit in range(num_units):
                if numerics.stride_in_last_unit:
                    strides = stage_strides[stage_index] if unit == num_units - 1 else 1
                else:
                    strides = stage_strides[stage_index] if unit == 0 else 1
                blocks.append(
                    Bottleneck(
                        width,
                        strides=strides,
                        stride_in_3x3=numerics.stride_in_last_unit,
                        projection=unit == 0,
                        numerics=numerics,
                        name=f"{name}_block{unit + 1}",
                    )
                )
                # Also an attribute: Keras 3 lists are not TF-trackable, so without this
                # tf.train.Checkpoint(model=...) would save only the stem (not the blocks).
                setattr(self, f"{name}_block{unit + 1}", blocks[-1])
            self.stages.append(blocks)
        self.conv4_subsample = (not numerics.stride_in_last_unit) and block3_stride

    @property
    def feature_channels(self):
        """Channels of each output feature map."""
        return {
            "conv1": self.base_width,
            **{
                name: self.base_width * 2**i * BOTTLENECK_EXPANSION
                for i, name in enumerate(STAGE_NAMES)
            },
        }

    def call_to_conv4(self, images, training=False, residual_activation=tf.nn.relu):
        """Runs conv1..conv4. Returns a dict with "conv1".."conv4" (S = "conv4").

        `residual_activation` replaces the ReLU on the residual sums of the conv2_x ..
        conv4_x units (the stem keeps its ReLU), e.g. SuperGlobal's ReLU+ at inference.
        """
        outputs = {}
        x = self.stem(images, training=training)
        outputs["conv1"] = x
        if self.pool1_pad is not None:
            x = self.pool1_pad(x)
        x = self.pool1(x)
        for name, blocks in zip(STAGE_NAMES[:3], self.stages[:3]):
            for block in blocks:
                x = block(x, training=training, activation=residual_activation)
            outputs[name] = x
        if self.conv4_subsample:
            outputs["conv4"] = x[:, ::2, ::2, :]
        return outputs

    def call_conv5(self, s, training=False):
        """Runs conv5 on S. Returns D."""
        x = s
        for block in self.stages[3]:
            x = block(x, training=training)
        return x

    def call(self, images, training=False):
        outputs = self.call_to_conv4(images, training=training)
        outputs["conv5"] = self.call_conv5(outputs["conv4"], training=training)
        return outputs

    def get_config(self):
        return {
            "name": self.name,
            "depth": self.depth,
            "layout": self.layout,
            "base_width": self.base_width,
            "units": list(self.units),
            "block3_stride": self.block3_stride,
            "bn_epsilon": self.bn_epsilon,
        }


def build_resnet(name="r50", layout="slim", **kwargs):
    """Builds a backbone by short name.

    Args:
      name: "r50", "r101", or "tiny" (units (1, 1, 1, 1), base width 8: a
        fast network with the same structure, for tests and CPU demos).
      layout: see `ResNet`.
      **kwargs: forwarded to `ResNet` (e.g. `block3_stride`, `base_width`).

    Returns:
      A `ResNet`.
    """
    presets = {
        "r50": dict(depth=50),
        "r101": dict(depth=101),
        "tiny": dict(depth=50, units=(1, 1, 1, 1), base_width=8),
    }
    if name not in presets:
        raise ValueError(f"backbone must be one of {sorted(presets)}, received {name!r}.")
    return ResNet(layout=layout, **{**presets[name], **kwargs})
