"""A short Glocal training run on the embedded photos raises Recall@1.

Trained through the real trainer on the embedded dataset's training landmarks (the
Glocal metric-learning split); Recall@1 is measured on the views of those landmarks that
the trainer holds out for validation, before (random initialisation) and after training.
(On the *unseen* landmarks a random network is already at ~92% Recall@1 on these 5 very
different photos, so that number cannot show learning; see docs/readme_glocal.md.)
"""

from delg_tf.data import cub
from delg_tf.evaluation import glocal as glocal_eval
from delg_tf.evaluation.recall_at_k import recall_at_k
from delg_tf.models.glocal import GlocalModelConfig
from delg_tf.training import data as training_data
from delg_tf.training import trainer
from training_helpers import short_embedded_run

IMAGE_SIZE = 64
STEPS = 150
BATCH_SIZE = 16
PRESET = "default"


def _recall_at_1(model, dataset):
    embeddings, labels = glocal_eval.embed_dataset(model, dataset)
    return recall_at_k(embeddings, labels, ks=(1,))[1]


def test_training_on_embedded_landmarks_raises_recall_at_1(tmp_path):
    config = short_embedded_run(
        tmp_path / "run",
        tmp_path / "data",
        STEPS,
        embedded_preset=PRESET,
        batch_size=BATCH_SIZE,
        image_size=IMAGE_SIZE,
    )
    trainer.train(config, GlocalModelConfig(backbone="tiny", aux_epochs=1))

    paths = training_data.embedded_metric_paths(config.data_dir, PRESET)
    _, held_out = training_data.split_holdout(
        cub.embedded_metric_split(paths, "train"),
        training_data.VALIDATION_FRACTION,
        training_data.EMBEDDED_SPLIT_SEED,
    )
    dataset = cub.make_metric_dataset(
        held_out,
        BATCH_SIZE,
        training=False,
        image_size=IMAGE_SIZE,
        resize_size=training_data.metric_resize_size(IMAGE_SIZE),
    )
    before = _recall_at_1(
        glocal_eval.load_glocal_run(config.logdir, glocal_eval.UNTRAINED), dataset
    )
    after = _recall_at_1(glocal_eval.load_glocal_run(config.logdir), dataset)
    # Measured: 0.75 -> 0.975 on the 40 held-out views (5 landmarks).
    assert after >= before + 0.1, (before, after)
