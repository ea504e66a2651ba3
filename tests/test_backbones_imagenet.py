"""ImageNet initialisation: slim/keras name mapping, fake slim checkpoint, keras.applications."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from delg_tf.backbones import imagenet, naming
from delg_tf.backbones.resnet import build_resnet


def _keys(backbone):
    return {naming.relative_key(v.path, backbone.name): v for v in backbone.weights}


def _built(name="tiny", layout="slim"):
    backbone = build_resnet(name, layout=layout)
    backbone(tf.zeros([1, 64, 64, 3]))
    return backbone


def test_slim_names_of_r50_keys():
    scope = naming.slim_scope(50)
    assert naming.key_to_slim("conv1/conv/kernel", scope) == "resnet_v1_50/conv1/weights"
    assert naming.key_to_slim("conv1/bn/moving_mean", scope) == (
        "resnet_v1_50/conv1/BatchNorm/moving_mean"
    )
    assert naming.key_to_slim("conv4_block6/2/conv/kernel", scope) == (
        "resnet_v1_50/block3/unit_6/bottleneck_v1/conv2/weights"
    )
    assert naming.key_to_slim("conv2_block1/0/bn/gamma", scope) == (
        "resnet_v1_50/block1/unit_1/bottleneck_v1/shortcut/BatchNorm/gamma"
    )
    assert naming.key_to_slim("conv2_block1/1/conv/bias", scope) is None
    assert naming.slim_to_key("resnet_v1_50/logits/weights") is None
    assert naming.key_to_keras_applications("conv5_block3/3/bn/beta") == (
        "conv5_block3_3_bn",
        "beta",
    )
    assert naming.keras_applications_to_key("conv1_conv", "bias") == "conv1/conv/bias"
    with pytest.raises(ValueError, match="expected e.g."):
        naming.parse_key("conv6_block1/1/conv/kernel")


def test_every_slim_backbone_key_round_trips():
    for key in _keys(_built()):
        slim = naming.key_to_slim(key, "resnet_v1_50")
        assert naming.slim_to_key(slim) == key


def _write_fake_slim_checkpoint(path, backbone, drop=None, extra=True):
    rng = np.random.default_rng(0)
    names, tensors, expected = [], [], {}
    for key, variable in _keys(backbone).items():
        if key == drop:
            continue
        value = rng.normal(size=variable.shape).astype(np.float32)
        if key.endswith("moving_variance"):
            value = np.abs(value) + 0.5
        names.append(naming.key_to_slim(key, "resnet_v1_50"))
        tensors.append(tf.constant(value))
        expected[key] = value
    if extra:  # What the real ImageNet checkpoint also holds.
        names += ["resnet_v1_50/logits/weights", "global_step"]
        tensors += [tf.zeros([1, 1, 256, 10]), tf.constant(7, tf.int64)]
    tf.raw_ops.SaveV2(
        prefix=path, tensor_names=names, shape_and_slices=[""] * len(names), tensors=tensors
    )
    return expected


def test_fake_slim_checkpoint_loads_into_slim_backbone(tmp_path):
    prefix = str(tmp_path / "resnet_v1_50.ckpt")
    expected = _write_fake_slim_checkpoint(prefix, _built())
    target = _built()
    message = imagenet.load_imagenet_weights(target, prefix)
    assert "85 weights" in message
    for key, variable in _keys(target).items():
        np.testing.assert_array_equal(variable.numpy(), expected[key])


def test_slim_checkpoint_problems_are_listed_and_nothing_assigned(tmp_path):
    prefix = str(tmp_path / "partial.ckpt")
    _write_fake_slim_checkpoint(prefix, _built(), drop="conv3_block1/2/bn/gamma")
    target = _built()
    before = [v.numpy() for v in target.weights]
    with pytest.raises(imagenet.ImageNetWeightsError, match=r"conv3_block1/2/bn/gamma: missing"):
        imagenet.load_imagenet_weights(target, prefix)
    for value, variable in zip(before, target.weights):
        np.testing.assert_array_equal(value, variable.numpy())
    with pytest.raises(imagenet.ImageNetWeightsError, match="backbone_layout='slim'"):
        imagenet.load_imagenet_weights(_built(layout="keras"), prefix)
    with pytest.raises(imagenet.ImageNetWeightsError, match="does not exist"):
        imagenet.load_imagenet_weights(target, str(tmp_path / "nope.ckpt"))


def test_no_spec_keeps_random_init_with_a_log_line(caplog):
    with caplog.at_level("WARNING"):
        message = imagenet.load_imagenet_weights(_built(), None)
    assert "randomly initialised" in message and "randomly initialised" in caplog.text


def test_imagenet_unreachable_gives_a_clear_error(monkeypatch):
    def offline(**kwargs):
        raise Exception("URL fetch failure: Name or service not known")

    monkeypatch.setattr(keras.applications, "ResNet50", offline)
    backbone = build_resnet("r50", layout="keras")
    with pytest.raises(imagenet.ImageNetWeightsError, match="unreachable.*local weights file"):
        imagenet.load_imagenet_weights(backbone, "imagenet")
    with pytest.raises(imagenet.ImageNetWeightsError, match="backbone_layout='keras'"):
        imagenet.load_imagenet_weights(_built(), "imagenet")


def test_keras_applications_weights_reproduce_keras_resnet50():
    app = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(None, None, 3))
    rng = np.random.default_rng(1)
    for layer in app.layers:  # Non-trivial BN statistics.
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(0, 0.1, layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, layer.moving_variance.shape))
    ours = build_resnet("r50", layout="keras", block3_stride=False)
    ours(tf.zeros([1, 64, 64, 3]))
    assert imagenet.load_keras_application(ours, app) == len(ours.weights)
    x = tf.random.uniform([1, 64, 64, 3], -1, 1, seed=2)
    np.testing.assert_allclose(ours(x)["conv5"].numpy(), app(x).numpy(), rtol=1e-4, atol=1e-4)
