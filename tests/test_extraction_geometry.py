"""Receptive-field constants, boxes and keypoints against hand computations."""

import numpy as np

from delg_tf.backbones.resnet import build_resnet
from delg_tf.extraction import geometry


def test_r50_slim_layers_give_the_official_constants():
    layers = geometry.resnet_conv4_layers(build_resnet("r50", layout="slim"))
    rf = geometry.receptive_field(layers)
    assert (rf.size, rf.stride, rf.padding) == (
        geometry.RECEPTIVE_FIELD_SIZE,
        geometry.FEATURE_STRIDE,
        geometry.RECEPTIVE_FIELD_PADDING,
    )
    assert (rf.size, rf.stride, rf.padding) == (291, 32, 145)
    # With an even conv1 output, slim's SAME pool1 pads only after: offset 143
    # (../shared/parity/tf1_slim/README.md), the official code keeps 145.
    even = geometry.receptive_field(
        geometry.resnet_conv4_layers(build_resnet("r50"), input_size_odd=False)
    )
    assert (even.size, even.stride, even.padding) == (291, 32, 143)


def test_receptive_field_recurrence_by_hand():
    # 3x3/1 pad 1, then 3x3/2 pad 1: size 1+2+2*1=5, stride 2, padding 1+1=2.
    layers = [geometry.LayerGeometry(3, 1, 1), geometry.LayerGeometry(3, 2, 1)]
    assert geometry.receptive_field(layers) == geometry.ReceptiveField(5, 2, 2)


def test_boxes_and_keypoints_by_hand():
    boxes = geometry.receptive_boxes_np(2, 3)
    # Cell (i=1, j=2): 32 * [1, 2, 1, 2] + [-145, -145, 145, 145].
    np.testing.assert_array_equal(boxes[1 * 3 + 2], [32 - 145, 64 - 145, 32 + 145, 64 + 145])
    np.testing.assert_array_equal(boxes[0], [-145, -145, 145, 145])
    # Pyramid scale 0.5 (boxes / 0.5), then host resize factors (h, w) = (0.5, 0.25):
    # centre (32, 64) / 0.5 = (64, 128) -> (128, 512) in original pixels.
    keypoints = geometry.keypoint_locations(boxes[5:6] / 0.5, scale_factors=(0.5, 0.25))
    np.testing.assert_allclose(keypoints, [[128.0, 512.0]])


def test_tf_boxes_equal_numpy():
    import tensorflow as tf

    np.testing.assert_array_equal(
        geometry.receptive_boxes(tf.constant(3), tf.constant(4)).numpy(),
        geometry.receptive_boxes_np(3, 4),
    )


def test_pyramid_uses_official_field_unless_no_block3_stride():
    from delg_tf.extraction.pyramid import PyramidExtractor
    from delg_tf.extraction.testing import TinyDelgStandIn

    model = TinyDelgStandIn()
    assert PyramidExtractor(model).receptive_field == geometry.OFFICIAL_RECEPTIVE_FIELD
    model.backbone.block3_stride = False  # only the attribute matters for this choice
    model.backbone.stages[2][-1].conv_2.strides = 1
    derived = PyramidExtractor(model).receptive_field
    assert derived.stride == geometry.FEATURE_STRIDE // geometry.BLOCK3_STRIDE_FACTOR
