"""The Glocal family through the trainer: a few steps, then restore and embed."""

import numpy as np

from delg_tf.evaluation.glocal import load_glocal_run
from delg_tf.models.glocal import GlocalModelConfig
from delg_tf.training import trainer
from training_helpers import short_embedded_run

IMAGE_SIZE = 64
STEPS = 4


def test_trainer_runs_glocal_and_run_restores(tmp_path):
    config = short_embedded_run(
        tmp_path / "run",
        tmp_path / "data",
        STEPS,
        embedded_preset="tiny",
        batch_size=8,
        image_size=IMAGE_SIZE,
    )
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
