"""The training loop in-process: loss goes down, TensorBoard scalars, resume, NaN guard."""

import dataclasses
import logging

import numpy as np
import pytest
import tensorflow as tf

from delg_tf.models.delg import DelgModelConfig
from delg_tf.training.config import TrainConfig
from delg_tf.training.trainer import (
    NonFiniteLossError,
    TRAIN_SUMMARY_DIR,
    VALIDATION_SUMMARY_DIR,
    train,
)
from training_helpers import (
    STANDIN_IMAGE_SIZE,
    StandInModel,
    embedded_tiny_data_dir,
    read_scalars,
    standin_data_fn,
    standin_model_fn,
)

DELG_METRICS = (
    "loss",
    "global_loss",
    "reconstruction_loss",
    "attention_loss",
    "global_accuracy",
    "attention_accuracy",
    "arcface_scale",
    "attention_mean",
    "sparsity_conv4",
    "sparsity_conv5",
    "learning_rate",
)


def _standin_config(logdir, **overrides):
    values = dict(
        logdir=str(logdir),
        data_source="embedded",
        max_iters=20,
        batch_size=8,
        image_size=STANDIN_IMAGE_SIZE,
        initial_lr=0.05,
        checkpoint_interval=10,
        summary_interval=1,
        log_interval=5,
        validation_interval=10,
        validation_steps=1,
    )
    values.update(overrides)
    return TrainConfig(**values)


def test_delg_fit_on_embedded_data_lowers_the_loss(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    config = TrainConfig(
        logdir=str(tmp_path / "run"),
        data_source="embedded",
        data_dir=embedded_tiny_data_dir(),
        embedded_preset="tiny",
        max_iters=30,
        batch_size=4,
        image_size=64,
        initial_lr=0.01,
        checkpoint_interval=30,
        summary_interval=1,
        log_interval=10,
        validation_interval=30,
        validation_steps=1,
    )
    model_config = DelgModelConfig(
        num_classes=1, backbone="tiny", embedding_dim=32, local_dim=8, attention_hidden=16
    )
    logdir = train(config, model_config)
    scalars = read_scalars(logdir / TRAIN_SUMMARY_DIR)
    for name in DELG_METRICS:
        assert name in scalars, name
    losses = [v for _, v in sorted(scalars["loss"])]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    lr = dict(scalars["learning_rate"])
    assert lr[1] == pytest.approx(0.01) and lr[30] < lr[1]
    assert "global_accuracy" in read_scalars(logdir / VALIDATION_SUMMARY_DIR)
    assert tf.train.latest_checkpoint(str(logdir)).endswith("ckpt-30")
    assert (logdir / "config.json").is_file() and (logdir / "flags.txt").is_file()
    assert "--backbone=tiny" in (logdir / "flags.txt").read_text()
    assert "--num_classes=4" in (logdir / "flags.txt").read_text()
    assert any(
        "step 10/30" in r.getMessage() and "steps/s=" in r.getMessage() for r in caplog.records
    )


def test_resume_continues_from_the_checkpoint(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    config = _standin_config(tmp_path)
    train(config, model_fn=standin_model_fn(), data_fn=standin_data_fn)
    caplog.clear()
    longer = dataclasses.replace(config, max_iters=30)
    train(longer, model_fn=standin_model_fn(), data_fn=standin_data_fn)
    messages = [r.getMessage() for r in caplog.records]
    assert any("resumed from checkpoint" in m and "at step 20" in m for m in messages)
    assert any("restored the data iterator position" in m for m in messages)
    steps = sorted(s for s, _ in read_scalars(tmp_path / TRAIN_SUMMARY_DIR)["loss"])
    assert steps == list(range(1, 31))
    caplog.clear()
    train(longer, model_fn=standin_model_fn(), data_fn=standin_data_fn)
    assert any("nothing to do" in r.getMessage() for r in caplog.records)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    config = _standin_config(tmp_path, max_iters=30, validation_interval=0)
    with pytest.raises(NonFiniteLossError) as info:
        train(config, model_fn=standin_model_fn(nan_at_step=13), data_fn=standin_data_fn)
    message = str(info.value)
    assert "step 13" in message and "ckpt-10" in message and "\n" not in message
    latest = tf.train.latest_checkpoint(str(tmp_path))
    assert latest.endswith("ckpt-10")
    reader = tf.train.load_checkpoint(latest)
    for name in reader.get_variable_to_shape_map():
        if name.startswith("model/"):
            assert np.all(np.isfinite(reader.get_tensor(name))), name


def test_init_from_fine_tunes_with_another_number_of_classes(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    source = _standin_config(tmp_path / "source", max_iters=5, validation_interval=0)
    train(source, model_fn=standin_model_fn(), data_fn=standin_data_fn)
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(source.logdir))
    conv_kernel = next(
        reader.get_tensor(k)
        for k in reader.get_variable_to_shape_map()
        if k.startswith("model/conv/") and "kernel" in k
    )
    captured = {}

    def five_classes(num_classes):
        del num_classes
        captured["model"] = StandInModel(5)
        return captured["model"]

    target = _standin_config(
        tmp_path / "target", max_iters=1, validation_interval=0, init_from=source.logdir
    )
    train(target, model_fn=five_classes, data_fn=standin_data_fn)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "initialised the model from" in messages and "classifier" in messages
    # One SGD step moved the weights a little from the restored ones.
    np.testing.assert_allclose(captured["model"].conv.kernel.numpy(), conv_kernel, atol=0.05)


def test_empty_training_data_is_a_clear_error(tmp_path):
    from delg_tf.data.errors import DataError

    def empty(config, seed):
        data = standin_data_fn(config, seed)
        data.train = data.train.take(0)
        return data

    with pytest.raises(DataError, match="ran out at step 0.*--batch_size=8"):
        train(_standin_config(tmp_path), model_fn=standin_model_fn(), data_fn=empty)
