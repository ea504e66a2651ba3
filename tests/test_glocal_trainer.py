"""The Glocal family through the trainer: a few steps, then restore and embed."""

import numpy as np

from delg_tf.evaluation.glocal import load_glocal_run
from delg_tf.models.glocal import GlocalModelConfig
from delg_tf.training import trainer
from delg_tf.training.config import TrainConfig

IMAGE_SIZE = 64
STEPS = 4


def test_trainer_runs_glocal_and_run_restores(tmp_path):
    config = TrainConfig(
        logdir=str(tmp_path / "run"),
        model_family="glocal",
        data_source="embedded",
        embedded_preset="tiny",
        data_dir=str(tmp_path / "data"),
        batch_size=8,
        image_size=IMAGE_SIZE,
        optimizer="adamw",
        initial_lr=1e-3,
        weight_decay=1e-4,
        lr_schedule="constant",
        max_iters=STEPS,
        checkpoint_interval=STEPS,
        summary_interval=STEPS,
        log_interval=STEPS,
        validation_interval=0,
        seed=0,
    ).validate()
    model_config = GlocalModelConfig(
        num_classes=1, backbone="tiny", local_dim=16, embedding_dim=8, aux_epochs=1
    )
    trainer.train(config, model_config)
    model = load_glocal_run(config.logdir)
    assert model.config.steps_per_epoch >= 1  # Filled by the trainer from the data.
    assert model.optimizer.iterations.numpy() == STEPS
    assert model.proxy_optimizer.iterations.numpy() == STEPS
    images = np.random.default_rng(0).uniform(0, 255, (2, IMAGE_SIZE, IMAGE_SIZE, 3))
    embedding = model(images.astype(np.float32)).numpy()
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, rtol=1e-5)
