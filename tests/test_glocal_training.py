"""A short Glocal training run on synthetic textures raises Recall@1."""

import keras
import numpy as np
import tensorflow as tf
from scipy.ndimage import gaussian_filter

from delg_tf.evaluation.recall_at_k import recall_at_k
from delg_tf.models.glocal import GlocalModelConfig, build_glocal_model

IMAGE_SIZE = 64
PROTOTYPE_SIZE = 96
NUM_CLASSES = 6
CLASSES_PER_BATCH = 6
IMAGES_PER_CLASS = 4
TEST_IMAGES_PER_CLASS = 8
TRAIN_STEPS = 60


def _prototypes():
    rng = np.random.default_rng(123)
    protos = [
        gaussian_filter(rng.normal(size=(PROTOTYPE_SIZE, PROTOTYPE_SIZE)), 2.0 + c % 3)
        for c in range(NUM_CLASSES)
    ]
    return [(p - p.mean()) / p.std() for p in protos]


def _textures(labels, rng, prototypes):
    """Random crops of a class's grey texture with a random colour tint and noise."""
    images = []
    for label in labels:
        y0, x0 = rng.integers(0, PROTOTYPE_SIZE - IMAGE_SIZE, 2)
        crop = prototypes[label][y0 : y0 + IMAGE_SIZE, x0 : x0 + IMAGE_SIZE]
        tint = rng.uniform(0.3, 1.0, 3)
        image = 127.5 + 60 * crop[..., None] * tint + rng.normal(0, 25, (IMAGE_SIZE,) * 2 + (3,))
        images.append(np.clip(image, 0, 255))
    return np.stack(images).astype(np.float32)


def test_short_training_raises_recall_at_1():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    prototypes = _prototypes()
    test_labels = np.repeat(np.arange(NUM_CLASSES), TEST_IMAGES_PER_CLASS)
    test_images = _textures(test_labels, rng, prototypes)
    model = build_glocal_model(
        GlocalModelConfig(
            num_classes=NUM_CLASSES,
            backbone="tiny",
            local_dim=32,
            embedding_dim=32,
            aux_epochs=1,
            steps_per_epoch=4,
            backbone_bn_training=False,
        )
    )
    model.compile(optimizer=keras.optimizers.AdamW(1e-3, weight_decay=1e-4))

    def recall_1():
        return recall_at_k(model(test_images, training=False).numpy(), test_labels, ks=(1,))[1]

    before = recall_1()
    step = tf.function(model.train_step)
    losses = []
    for _ in range(TRAIN_STEPS):
        labels = np.repeat(
            rng.choice(NUM_CLASSES, CLASSES_PER_BATCH, replace=False), IMAGES_PER_CLASS
        )
        out = step((tf.constant(_textures(labels, rng, prototypes)), tf.constant(labels)))
        losses.append(float(out["metric_loss"]))
    after = recall_1()
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    assert after >= before + 0.1, (before, after)
