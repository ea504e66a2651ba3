"""Helpers of tests/test_training_*.py: a stand-in model, shared data, event reading.

Used by tests/test_training_*.py to exercise the loop without the DELG model.
"""

import keras
import numpy as np
import tensorflow as tf

from delg_tf.training.config import TrainConfig
from delg_tf.training.data import TrainData

STANDIN_CLASSES = 3
STANDIN_IMAGE_SIZE = 16
STANDIN_EXAMPLES = 48
PIXEL_MAX = 255.0


class StandInModel(keras.Model):
    """Conv + GAP + dense classifier; `train_step` applies its own gradients.

    Args:
        num_classes: classifier width.
        nan_at_step: if > 0, the loss becomes NaN from this (1-based) step on.
    """

    def __init__(self, num_classes=STANDIN_CLASSES, nan_at_step=0, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.nan_at_step = nan_at_step
        self.conv = keras.layers.Conv2D(8, 3, activation="relu", name="conv")
        self.pool = keras.layers.GlobalAveragePooling2D(name="pool")
        self.classifier = keras.layers.Dense(num_classes, name="classifier")

    def build(self, input_shape):
        self.conv.build(input_shape)
        self.classifier.build((None, 8))
        self.steps_seen = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="steps_seen"
        )

    def call(self, images, training=False):
        return self.classifier(self.pool(self.conv(images / PIXEL_MAX - 0.5)))

    def _loss(self, images, labels, training):
        logits = self(images, training=training)
        loss = tf.reduce_mean(
            keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        )
        accuracy = tf.reduce_mean(
            tf.cast(
                tf.equal(tf.argmax(logits, -1, output_type=tf.int32), tf.cast(labels, tf.int32)),
                tf.float32,
            )
        )
        return loss, accuracy

    def train_step(self, data):
        images, labels = data
        self.steps_seen.assign_add(1.0)
        with tf.GradientTape() as tape:
            loss, accuracy = self._loss(images, labels, True)
            if self.nan_at_step:
                # Forward-only poison: the weights stay finite, only the loss is NaN.
                loss = loss + tf.where(self.steps_seen >= self.nan_at_step, np.nan, 0.0)
            scaled = loss / tf.distribute.get_strategy().num_replicas_in_sync
        grads = tape.gradient(scaled, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        return {"loss": loss, "global_loss": loss, "accuracy": accuracy}

    def test_step(self, data):
        images, labels = data
        loss, accuracy = self._loss(images, labels, False)
        return {"loss": loss, "accuracy": accuracy}


def standin_examples(seed=0, count=STANDIN_EXAMPLES):
    """Images whose mean colour tells the class, labels in [0, STANDIN_CLASSES)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % STANDIN_CLASSES
    images = rng.uniform(0, 80, (count, STANDIN_IMAGE_SIZE, STANDIN_IMAGE_SIZE, 3))
    for c in range(STANDIN_CLASSES):
        images[labels == c, :, :, c] += 170
    return images.astype(np.float32), labels.astype(np.int32)


def standin_data_fn(config, seed):
    images, labels = standin_examples()
    split = int(len(labels) * 0.8)
    train = (
        tf.data.Dataset.from_tensor_slices((images[:split], labels[:split]))
        .shuffle(split, seed=seed)
        .repeat()
        .batch(config.batch_size, drop_remainder=True)
    )
    validation = tf.data.Dataset.from_tensor_slices((images[split:], labels[split:])).batch(
        config.batch_size, drop_remainder=True
    )
    return TrainData(
        train=train,
        validation=validation,
        num_classes=STANDIN_CLASSES,
        description="stand-in colour squares",
    )


def standin_model_fn(nan_at_step=0):
    return lambda num_classes: StandInModel(num_classes, nan_at_step=nan_at_step)


# --------------------------------------------------------------------------
# Shared small data and helpers for subprocess runs
# --------------------------------------------------------------------------

_EMBEDDED_CACHE = {}
TINY_DELG_FLAGS = (
    "--model_family=delg",
    "--data_source=embedded",
    "--embedded_preset=tiny",
    "--backbone=tiny",
    "--embedding_dim=32",
    "--local_dim=8",
    "--attention_hidden=16",
    "--batch_size=4",
    "--image_size=64",
    "--initial_lr=0.01",
    "--log_interval=5",
    "--summary_interval=1",
    "--validation_steps=1",
)


def embedded_tiny_data_dir():
    """A data dir holding the tiny embedded dataset and its TFRecords (built once)."""
    import atexit
    import shutil
    import tempfile

    from delg_tf.training.config import TrainConfig
    from delg_tf.training.data import _embedded_tfrecords

    if "dir" not in _EMBEDDED_CACHE:
        data_dir = tempfile.mkdtemp(prefix="delg_tf_train_data_")
        atexit.register(shutil.rmtree, data_dir, ignore_errors=True)
        _embedded_tfrecords(
            TrainConfig(
                logdir=data_dir, data_source="embedded", data_dir=data_dir, embedded_preset="tiny"
            )
        )
        _EMBEDDED_CACHE["dir"] = data_dir
    return _EMBEDDED_CACHE["dir"]


def read_scalars(event_dir):
    """{tag: [(step, value), ...]} from the TensorBoard event files of a folder."""
    import glob
    import os

    from tensorflow.core.util import event_pb2

    scalars = {}
    for path in sorted(glob.glob(os.path.join(event_dir, "events.out.tfevents.*"))):
        for record in tf.data.TFRecordDataset(path):
            event = event_pb2.Event.FromString(record.numpy())
            for value in event.summary.value:
                number = float(tf.make_ndarray(value.tensor))
                scalars.setdefault(value.tag, []).append((event.step, number))
    return scalars


def short_embedded_run(logdir, data_dir, steps, **overrides):
    """The validated `TrainConfig` of a short Glocal run on the embedded data.

    AdamW at a constant 1e-3 (weight decay 1e-4), `steps` iterations with one
    checkpoint, summary and log at the end, no validation, seed 0; `overrides`
    replace any field (e.g. `embedded_preset`, `batch_size`, `image_size`).
    """
    values = dict(
        logdir=str(logdir),
        model_family="glocal",
        data_source="embedded",
        data_dir=str(data_dir),
        optimizer="adamw",
        initial_lr=1e-3,
        weight_decay=1e-4,
        lr_schedule="constant",
        max_iters=steps,
        checkpoint_interval=steps,
        summary_interval=steps,
        log_interval=steps,
        validation_interval=0,
        seed=0,
    )
    values.update(overrides)
    return TrainConfig(**values).validate()
