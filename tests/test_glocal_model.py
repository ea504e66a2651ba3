"""GlocalModel: configuration, auxiliary-loss schedule, proxy optimizer, checkpoints."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from delg_tf.models import registry
from delg_tf.models.glocal import AUX_ALL_EPOCHS, GlocalModelConfig, build_glocal_model

TINY = dict(num_classes=4, backbone="tiny", local_dim=16, embedding_dim=8)
IMAGE_SIZE = 64


def _batch(seed=0, batch=4):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, (batch, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    return tf.constant(images), tf.constant([0, 1, 1, 2][:batch])


def _compiled(**overrides):
    model = build_glocal_model(GlocalModelConfig(**{**TINY, **overrides}))
    model.compile(optimizer=keras.optimizers.AdamW(1e-3, weight_decay=1e-4))
    return model


def test_embedding_is_unit_norm_and_modes_build():
    images, _ = _batch()
    for overrides in (
        dict(),
        dict(concat_stage="before_ofm", global_descriptors="G,M,S"),
        dict(global_layer="layer4", local_layer="layer3", aux_weight=0),
        dict(descriptor_branches="global"),
        dict(descriptor_branches="local"),
    ):
        model = build_glocal_model(GlocalModelConfig(**{**TINY, "steps_per_epoch": 1, **overrides}))
        embedding = model(images).numpy()
        assert embedding.shape == (4, 8)
        np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, rtol=1e-5)
        if overrides.get("global_layer"):
            assert model.config.global_layer == "conv5" and model.aux_classifier is None
        if overrides.get("descriptor_branches") == "global":
            assert model.local_module is None and len(model.fusion_fcs) == 2
        if overrides.get("descriptor_branches") == "local":
            assert model.local_module is not None and len(model.fusion_fcs) == 1
            assert model.aux_classifier is not None  # Global module kept for L_A.


def test_auxiliary_loss_switches_off_after_n_epochs():
    model = _compiled(aux_epochs=2, steps_per_epoch=2)
    weights = [float(model.train_step(_batch(i))["aux_weight"]) for i in range(6)]
    assert weights == [3.0] * 4 + [0.0] * 2
    # -1 = all epochs; lambda = 0 = no auxiliary module at all.
    always = _compiled(aux_epochs=AUX_ALL_EPOCHS)
    assert float(always.aux_loss_weight(10**6)) == 3.0
    off = _compiled(aux_weight=0.0)
    assert off.aux_classifier is None and float(off.train_step(_batch())["aux_loss"]) == 0.0


def test_aux_epochs_need_steps_per_epoch():
    GlocalModelConfig(**TINY).validate()  # Flag-time: the trainer fills steps_per_epoch.
    with pytest.raises(ValueError, match="steps_per_epoch"):
        build_glocal_model(GlocalModelConfig(**TINY))
    with pytest.raises(ValueError, match="multiple of the number of global descriptors"):
        GlocalModelConfig(**{**TINY, "global_descriptors": "G,M,S"}).validate()


def test_proxies_use_their_own_optimizer_with_scaled_learning_rate():
    model = _compiled(aux_weight=0.0, proxy_lr_multiplier=100.0)
    assert model.proxy_optimizer is not model.optimizer
    np.testing.assert_allclose(float(model.proxy_optimizer.learning_rate), 0.1, rtol=1e-6)
    before_proxies = model.proxies.numpy().copy()
    before_fc = model.fusion_fcs[0].kernel.numpy().copy()
    model.train_step(_batch())
    # Adam's first step moves every weight by about lr (sign of the gradient).
    proxy_step = np.abs(model.proxies.numpy() - before_proxies).max()
    fc_step = np.abs(model.fusion_fcs[0].kernel.numpy() - before_fc).max()
    assert 0.05 < proxy_step < 0.2 and fc_step < 2e-3
    assert model.proxy_optimizer.iterations.numpy() == 1
    assert not any(v is model.proxies for v in model.optimizer.variables)


def test_checkpoint_restores_heads_and_proxy_optimizer(tmp_path):
    model = _compiled(aux_weight=0.0)
    for i in range(2):
        model.train_step(_batch(i))
    path = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    clone = _compiled(aux_weight=0.0)
    tf.train.Checkpoint(model=clone).restore(path).expect_partial()
    assert clone.proxy_optimizer.iterations.numpy() == 2
    np.testing.assert_allclose(clone.proxies.numpy(), model.proxies.numpy())
    for a, b in zip(model.weights, clone.weights):  # Backbone, heads and proxies.
        assert a.path == b.path
        np.testing.assert_allclose(a.numpy(), b.numpy(), err_msg=a.path)


def test_unused_conv5_is_not_trained():
    model = build_glocal_model(GlocalModelConfig(**TINY, aux_weight=0.0))
    count = len(model.trainable_variables)
    model.backbone(tf.zeros([1, IMAGE_SIZE, IMAGE_SIZE, 3]))  # As a weight loader would.
    assert any("conv5" in w.path for w in model.weights)
    assert len(model.trainable_variables) == count


def test_registry_builds_glocal():
    model = registry.build_model("glocal", dict(TINY, steps_per_epoch=5), load_imagenet=False)
    assert model.config.steps_per_epoch == 5 and model.built
    assert model.get_config()["config"]["global_descriptors"] == "G,M"
