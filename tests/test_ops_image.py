"""Image normalisation modes against numpy."""

import numpy as np
import pytest

from delg_tf.models.delg import DelgModelConfig
from delg_tf.ops import image as image_ops


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("delf", lambda x: (x - 127.5) / 127.5),
        ("delf_tf1", lambda x: (x - 128.0) / 128.0),
        ("caffe", lambda x: x[..., ::-1] - np.array([103.939, 116.779, 123.68])),
        ("vgg", lambda x: x - np.array([123.68, 116.78, 103.94])),
    ],
)
def test_normalize_images_matches_numpy(mode, expected):
    x = np.random.default_rng(0).integers(0, 256, size=(2, 5, 7, 3)).astype(np.uint8)
    got = image_ops.normalize_images(x, mode).numpy()
    np.testing.assert_allclose(got, expected(x.astype(np.float64)), atol=1e-4)


def test_unknown_mode_names_the_choices():
    with pytest.raises(ValueError, match="delf_tf1"):
        image_ops.normalize_images(np.zeros((1, 2, 2, 3)), "imagenet")


def test_default_normalisation_follows_layout_and_weights():
    assert DelgModelConfig(num_classes=2).resolved_image_normalization() == "delf"
    keras_layout = DelgModelConfig(num_classes=2, backbone_layout="keras")
    assert keras_layout.resolved_image_normalization() == "caffe"
    slim_imagenet = DelgModelConfig(num_classes=2, imagenet_weights="/w/resnet_v1_50.ckpt")
    assert slim_imagenet.resolved_image_normalization() == "vgg"
