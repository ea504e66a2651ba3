"""Receptive-field geometry of DELG local features: boxes and keypoints.

A local feature of DELG is a cell (i, j) of the conv4 map S (paper Sec. 3.2).
Its keypoint is the centre of the cell's receptive field in the image. The
official extractor (tensorflow/models research/delf, `CalculateReceptiveBoxes`
in `feature_extractor.py`, used by `export_model_utils.py`) computes the box of
cell (i, j) of a map from a pyramid level as

    box = stride * [i, j, i, j] + [-padding, -padding, -padding + rf - 1,
                                   -padding + rf - 1]           (ymin, xmin, ymax, xmax)

with rf = 291, stride = 16 * 2 (block3 stride) = 32, padding = 145, divides the
box by the pyramid scale, and takes keypoint = box centre (then divides by the
host-side resize factors). These are the values of tf-slim `resnet_v1_50` up to
block3 with the conv5 stride moved into conv4 (paper Sec. 4.1).

`receptive_field(layers)` derives (rf, stride, padding) from a list of layers
(kernel, stride, padding before); `resnet_conv4_layers(resnet)` lists the
layers of a `delg_tf.backbones.resnet.ResNet` on its longest path to S, so a
test derives 291 / 32 / 145 from the R50 slim layout instead of copying them.

Note (../shared/parity/tf1_slim/README.md): with slim's SAME `pool1` the true
offset is 145 only when the conv1 output size is odd (143 when even); the
official code always uses 145 and so do we, for parity.
"""

import dataclasses

import numpy as np

# Official DELG constants (tf-slim resnet_v1_50/block3 with the block3 stride).
RECEPTIVE_FIELD_SIZE = 291
BACKBONE_STRIDE_BEFORE_BLOCK3_STRIDE = 16
BLOCK3_STRIDE_FACTOR = 2
FEATURE_STRIDE = BACKBONE_STRIDE_BEFORE_BLOCK3_STRIDE * BLOCK3_STRIDE_FACTOR  # 32
RECEPTIVE_FIELD_PADDING = 145
BOX_COORDINATES = 4  # (ymin, xmin, ymax, xmax)


@dataclasses.dataclass(frozen=True)
class LayerGeometry:
    """One spatial layer on a path through a network.

    Attributes:
      kernel: kernel size (square).
      stride: stride.
      pad_before: zero padding added before the first row/column.
      name: informative name.
    """

    kernel: int
    stride: int
    pad_before: int
    name: str = ""


@dataclasses.dataclass(frozen=True)
class ReceptiveField:
    """Receptive field of the last layer of a path.

    Attributes:
      size: receptive-field size in input pixels.
      stride: distance in input pixels between adjacent output cells.
      padding: offset such that the field of output cell i starts at
        stride * i - padding.
    """

    size: int
    stride: int
    padding: int


OFFICIAL_RECEPTIVE_FIELD = ReceptiveField(
    RECEPTIVE_FIELD_SIZE, FEATURE_STRIDE, RECEPTIVE_FIELD_PADDING
)


def same_pad_before(kernel, stride, input_size_odd=True):
    """Padding before of TF 'SAME' for an input whose size has the given parity.

    TF pads total = max(k - s, 0) if n % s == 0 else max(k - n % s, 0), and puts
    floor(total / 2) before. For stride 1 this is (k - 1) // 2; for stride 2 it
    depends on the parity of n.
    """
    if stride == 1:
        return (kernel - 1) // 2
    if stride != 2:
        raise ValueError(f"same_pad_before supports strides 1 and 2, received {stride}.")
    total = max(kernel - 1, 0) if input_size_odd else max(kernel - stride, 0)
    return total // 2


def receptive_field(layers):
    """Receptive field, stride and padding of a chain of layers.

    Recurrence: size += (k - 1) * jump; padding += pad_before * jump; jump *= s,
    where jump is the current distance in input pixels between adjacent cells.

    Args:
      layers: iterable of `LayerGeometry`, input side first.

    Returns:
      A `ReceptiveField`.
    """
    size, jump, padding = 1, 1, 0
    for layer in layers:
        size += (layer.kernel - 1) * jump
        padding += layer.pad_before * jump
        jump *= layer.stride
    return ReceptiveField(size=size, stride=jump, padding=padding)


def resnet_conv4_layers(resnet, input_size_odd=True):
    """Spatial layers of a ResNet on the longest path from the image to S (conv4).

    The longest path goes through the stem, pool1 and the 3x3 convolution of
    every bottleneck unit of conv2..conv4 (1x1 convolutions and shortcuts do not
    widen the field). Works on a `delg_tf.backbones.resnet.ResNet` without
    building it.

    Args:
      resnet: a `ResNet` instance (any layout).
      input_size_odd: parity assumed for inputs of stride-2 'same' layers whose
        padding depends on it (slim's pool1; the official constants assume odd).

    Returns:
      list of `LayerGeometry`.
    """
    from delg_tf.backbones import resnet as resnet_lib  # Lazy: keeps this module TF-free.

    layers = []
    stem = resnet.stem
    if stem.strides > 1 and stem.padding == "symmetric":
        stem_pad = resnet_lib.symmetric_padding(stem.kernel_size)[0][0]
    else:
        stem_pad = same_pad_before(stem.kernel_size, stem.strides, input_size_odd)
    layers.append(LayerGeometry(stem.kernel_size, stem.strides, stem_pad, "conv1"))
    pool = resnet.pool1
    pool_size = pool.pool_size[0]
    pool_stride = pool.strides[0]
    if resnet.pool1_pad is not None:
        pool_pad = resnet.pool1_pad.padding[0][0]
    elif pool.padding == "same":
        pool_pad = same_pad_before(pool_size, pool_stride, input_size_odd)
    else:
        pool_pad = 0
    layers.append(LayerGeometry(pool_size, pool_stride, pool_pad, "pool1"))
    for stage_name, blocks in zip(resnet_lib.STAGE_NAMES[:3], resnet.stages[:3]):
        for unit, block in enumerate(blocks):
            for conv_name in ("conv_1", "conv_2"):
                conv = getattr(block, conv_name)
                if conv.kernel_size == 1 and conv.strides == 1:
                    continue
                if conv.strides > 1 and conv.padding == "symmetric":
                    pad = resnet_lib.symmetric_padding(conv.kernel_size)[0][0]
                else:
                    pad = same_pad_before(conv.kernel_size, conv.strides, input_size_odd)
                layers.append(
                    LayerGeometry(
                        conv.kernel_size,
                        conv.strides,
                        pad,
                        f"{stage_name}_block{unit + 1}_{conv_name}",
                    )
                )
    if getattr(resnet, "conv4_subsample", False):
        layers.append(LayerGeometry(1, 2, 0, "conv4_subsample"))
    return layers


def receptive_boxes_np(height, width, rf=OFFICIAL_RECEPTIVE_FIELD):
    """Receptive boxes of every cell of an [height, width] feature map (numpy).

    Row-major order (i over height, j over width), as the official
    `CalculateReceptiveBoxes`.

    Returns:
      float32 [height * width, 4] boxes (ymin, xmin, ymax, xmax) in the pixels
      of the image fed to the network.
    """
    ii, jj = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    coords = np.stack([ii.ravel(), jj.ravel()], axis=1).astype(np.float32)
    point_boxes = np.concatenate([coords, coords], axis=1)
    bias = np.array(
        [-rf.padding, -rf.padding, -rf.padding + rf.size - 1, -rf.padding + rf.size - 1], np.float32
    )
    return rf.stride * point_boxes + bias


def receptive_boxes(height, width, rf=OFFICIAL_RECEPTIVE_FIELD):
    """TensorFlow version of `receptive_boxes_np` (height, width: int32 scalars)."""
    import tensorflow as tf

    ii, jj = tf.meshgrid(tf.range(height), tf.range(width), indexing="ij")
    coords = tf.cast(tf.reshape(tf.stack([ii, jj], axis=2), [-1, 2]), tf.float32)
    point_boxes = tf.concat([coords, coords], axis=1)
    bias = tf.constant(
        [-rf.padding, -rf.padding, -rf.padding + rf.size - 1, -rf.padding + rf.size - 1], tf.float32
    )
    return float(rf.stride) * point_boxes + bias


def box_centers(boxes):
    """Keypoint (y, x) = centre of each box (ymin, xmin, ymax, xmax); numpy or TF."""
    return (boxes[:, 0:2] + boxes[:, 2:4]) / 2.0


def keypoint_locations(boxes, scale_factors=(1.0, 1.0)):
    """Keypoints (y, x) in original-image pixels from boxes in fed-image pixels.

    Args:
      boxes: [N, 4] boxes returned by the model (already divided by the pyramid
        scale, i.e. in the pixels of the image fed to the model).
      scale_factors: (height, width) factors of the host-side resize
        (new / original), as returned by `resize_image_like_official`.

    Returns:
      float32 [N, 2] (y, x).
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, BOX_COORDINATES)
    # float32 / float32(scale_factors): what TF does in the official extractor.
    return box_centers(boxes) / np.asarray(scale_factors, np.float32)
