"""DelgModel: feature-map shapes, gradient stopping, training, configs, registry."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from delg_tf.backbones.resnet import build_resnet
from delg_tf.models import registry
from delg_tf.models.delg import DelgModel, DelgModelConfig

NUM_CLASSES = 4
IMAGE_SIZE = 64
TINY = dict(
    num_classes=NUM_CLASSES,
    backbone="tiny",
    embedding_dim=32,
    local_dim=8,
    attention_hidden=16,
    arcface_scale_init=16.0,
)


def tiny_model(**overrides):
    model = DelgModel(DelgModelConfig(**{**TINY, **overrides}))
    model.build()
    return model


def tiny_batch(batch=4, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, size=(batch, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    labels = np.arange(batch) % NUM_CLASSES
    return tf.constant(images), tf.constant(labels, tf.int32)


def test_r50_slim_feature_shapes_at_512():
    # Paper Sec. 4.1 / slim: the conv5 stride moved into the last unit of conv4, so at
    # 512x512 both S (conv4) and D (conv5) are 16x16 (stride 32):
    # S = [1, 16, 16, 1024], D = [1, 16, 16, 2048].
    backbone = build_resnet("r50", layout="slim", block3_stride=True)
    features = backbone(tf.zeros([1, 512, 512, 3]))
    assert tuple(features["conv4"].shape) == (1, 16, 16, 1024)
    assert tuple(features["conv5"].shape) == (1, 16, 16, 2048)


def test_inference_api_shapes():
    model = tiny_model()
    images, _ = tiny_batch(2)
    out = model(images)
    # tiny backbone: S has 16 * 8 = 128 channels, D 256; stride 32 -> 2x2 maps.
    assert tuple(out["global_descriptor"].shape) == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(out["global_descriptor"], axis=1), 1.0, rtol=1e-5)
    assert tuple(out["attention"].shape) == (2, 2, 2, 1)
    assert tuple(out["local_descriptors"].shape) == (2, 2, 2, 8)
    features = model.backbone(model.preprocess(images))
    prob, descriptors = model.local_head(features["conv4"])
    np.testing.assert_allclose(prob, out["attention"], atol=1e-6)
    np.testing.assert_allclose(descriptors, out["local_descriptors"], atol=1e-6)
    g = model.global_head(features["conv5"])
    np.testing.assert_allclose(g, out["global_descriptor_raw"], atol=1e-5)


def _max_abs(grads):
    return max(float(tf.reduce_max(tf.abs(g))) for g in grads)


def test_gradient_stopping_exact_zero_vs_naive_nonzero():
    images, labels = tiny_batch()
    stopped = tiny_model(stop_gradients=True)
    grads = stopped.compute_gradients((images, labels))
    # lambda L_r + beta L_a: exactly zero on every backbone variable, non-zero on the heads.
    assert _max_abs(grads["local_loss"]["backbone"]) == 0.0
    assert _max_abs(grads["local_loss"]["local_head"]) > 0.0
    assert _max_abs(grads["global_loss"]["backbone"]) > 0.0
    assert _max_abs(grads["global_loss"]["local_head"]) == 0.0

    naive = tiny_model(stop_gradients=False)
    naive.set_weights(stopped.get_weights())
    grads = naive.compute_gradients((images, labels))
    assert _max_abs(grads["local_loss"]["backbone"]) > 0.0


def test_train_step_stops_backbone_updates_from_local_losses():
    """With stopping, the backbone moves exactly as with L_g alone (lambda = beta = 0)."""
    images, labels = tiny_batch()
    results = {}
    for name, weights in (
        ("full", dict(reconstruction_weight=10.0, attention_weight=1.0)),
        ("global_only", dict(reconstruction_weight=0.0, attention_weight=0.0)),
    ):
        keras.utils.set_random_seed(1)
        model = tiny_model(gradient_clip_norm=None, **weights)
        model.compile(optimizer=keras.optimizers.SGD(0.1))
        model.train_step((images, labels))
        results[name] = [v.numpy() for v in model.backbone.trainable_variables]
    for a, b in zip(results["full"], results["global_only"]):
        np.testing.assert_array_equal(a, b)


def test_few_train_steps_lower_the_loss():
    keras.utils.set_random_seed(0)
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    images, labels = tiny_batch(8)
    logs = [model.train_step((images, labels)) for _ in range(6)]
    expected_keys = {
        "loss",
        "global_loss",
        "reconstruction_loss",
        "attention_loss",
        "global_accuracy",
        "attention_accuracy",
        "arcface_scale",
        "attention_mean",
        "attention_min",
        "attention_max",
        "attention_median",
        "sparsity_conv4",
        "sparsity_conv5",
    }
    assert expected_keys <= set(logs[0])
    assert all(np.isfinite(float(v)) for v in logs[-1].values())
    assert float(logs[-1]["loss"]) < float(logs[0]["loss"])
    assert float(logs[-1]["global_loss"]) < float(logs[0]["global_loss"])
    assert 0.0 <= float(logs[0]["sparsity_conv4"]) <= 1.0
    val = model.test_step((images, labels))
    assert 0.0 <= float(val["global_accuracy"]) <= 1.0


# Every DelgModelConfig field with a non-default value (a valid combination).
NON_DEFAULT_CONFIG = dict(
    num_classes=5,
    backbone="tiny",
    backbone_layout="tf2_delf",
    block3_stride=False,
    backbone_kwargs={"base_width": 4},
    image_normalization="caffe",
    gem_power=2.5,
    learn_gem_power=True,
    embedding_dim=24,
    local_dim=6,
    attention_hidden=10,
    attention_use_bn=False,
    attention_conv1_bias=False,
    attention_bn_epsilon=1e-5,
    attention_input="reconstruction",
    attention_pool_source="features",
    attention_pool_reduction="mean",
    attention_pool_normalize=True,
    arcface_margin=0.2,
    arcface_scale_init=12.0,
    learn_arcface_scale=False,
    reconstruction_weight=5.0,
    attention_weight=0.5,
    stop_gradients=False,
    backbone_bn_training=False,
    gradient_clip_norm=3.0,
    imagenet_weights="/not/loaded/by/the/constructor.ckpt",
)


def test_get_config_is_exactly_the_constructor_config():
    import dataclasses

    fields = dataclasses.fields(DelgModelConfig)
    assert sorted(NON_DEFAULT_CONFIG) == sorted(f.name for f in fields)
    for f in fields:
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        assert NON_DEFAULT_CONFIG[f.name] != default, f.name
    model = DelgModel(DelgModelConfig(**NON_DEFAULT_CONFIG), name="delg_probe")
    assert model.get_config() == {"name": "delg_probe", "config": NON_DEFAULT_CONFIG}
    clone = DelgModel.from_config(model.get_config())
    assert clone is not model
    assert clone.get_config() == {"name": "delg_probe", "config": NON_DEFAULT_CONFIG}
    # The rebuilt layers carry the values, and the same weights give the same outputs.
    assert clone.attention.bn_conv1 is None and clone.attention.hidden_channels == 10
    assert clone.attention.bn_epsilon == 1e-5 and clone.gem.learn_power
    assert clone.cosine_classifier.margin == 0.2 and clone.attention_pooling.reduction == "mean"
    model.build()
    clone.build()
    assert len(clone.weights) == len(model.weights)
    clone.set_weights(model.get_weights())
    images, _ = tiny_batch(2)
    expected, got = model(images), clone(images)
    assert sorted(got) == sorted(expected)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])


def test_config_validation():
    config = DelgModelConfig(**TINY)
    assert DelgModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="backbone must be one of"):
        DelgModelConfig(**{**TINY, "backbone": "r152"}).validate()
    with pytest.raises(ValueError, match="num_classes"):
        DelgModelConfig(**{**TINY, "num_classes": 0}).validate()
    with pytest.raises(ValueError, match="unknown keys"):
        DelgModelConfig.from_dict({**TINY, "gem_p": 3})
    with pytest.raises(ValueError, match="backbone_layout='keras'"):
        DelgModelConfig(**{**TINY, "imagenet_weights": "imagenet"}).validate()
    assert DelgModelConfig(num_classes=3).resolved_arcface_scale_init() == pytest.approx(
        45.25, abs=0.01
    )


def test_registry_builds_delg_and_refuses_unknown():
    model = registry.build_model("delg", dict(TINY))
    assert isinstance(model, DelgModel) and model.built
    assert "delg" in registry.model_families()
    assert registry.model_config_class("delg") is DelgModelConfig
    assert registry.model_class("delg") is DelgModel
    with pytest.raises(ValueError, match="model family"):
        registry.build_model("nope", {})


MIRRORED_SCRIPT = textwrap.dedent("""
    import numpy as np, tensorflow as tf, keras
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from delg_tf.models.delg import DelgModel, DelgModelConfig
    # No batch statistics (they are per replica), so one mirrored step on 2 x 2 images
    # must equal one single-device step on the 4 images.
    import sys
    clip = None if sys.argv[1] == "none" else float(sys.argv[1])
    config = dict(num_classes=4, backbone="tiny", embedding_dim=16, local_dim=8,
                  attention_hidden=8, backbone_bn_training=False, attention_use_bn=False,
                  gradient_clip_norm=clip)
    images = np.random.default_rng(0).uniform(0, 255, (4, 64, 64, 3)).astype("float32")
    labels = np.arange(4, dtype="int32")
    single = DelgModel(DelgModelConfig(**config))
    single.compile(optimizer=keras.optimizers.SGD(0.1))
    initial = single.get_weights()
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = DelgModel(DelgModelConfig(**config))
        model.build()
        model.set_weights(initial)
        model.compile(optimizer=keras.optimizers.SGD(0.1))
    single.train_step((images, labels))
    dist = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensors((images, labels)))
    step = tf.function(lambda batch: strategy.run(model.train_step, args=(batch,)))
    for batch in dist:
        logs = step(batch)
    loss = float(strategy.reduce("MEAN", logs["loss"], axis=None))
    assert np.isfinite(loss), loss
    diff = max(np.abs(a - b).max() for a, b in zip(single.get_weights(), model.get_weights()))
    moved = max(np.abs(a - b).max() for a, b in zip(single.get_weights(), initial))
    # With a binding clip (1e-3, far below the gradient norm) the step is small but must
    # be the single-device one: clipping sees the global gradient, not each replica's
    # share (clipped shares would sum to up to twice the step).
    assert moved > 0 and diff <= 1e-2 * moved, (diff, moved)
    norm = float(strategy.reduce("MEAN", logs["gradient_norm"], axis=None))
    print("OK", loss, diff, norm)
""")


@pytest.mark.parametrize("clip", ["none", "0.001"])
def test_train_step_under_mirrored_strategy_two_cpus(clip):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT, clip],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_keras_save_and_load_round_trip(tmp_path):
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    images, _ = tiny_batch(2)
    path = str(tmp_path / "delg.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, DelgModel) and loaded.config == model.config
    np.testing.assert_allclose(
        loaded(images)["global_descriptor"], model(images)["global_descriptor"], atol=1e-6
    )
