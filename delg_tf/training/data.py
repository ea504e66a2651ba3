"""Training/validation datasets for the trainer, per `TrainConfig.data_source`.

A thin adapter over the data room so that the trainer sees one interface:

* "gldv2": TFRecords of the official DELF `build_image_dataset.py` format,
  read with `delg_tf.data.gldv2.make_dataset`.
* "embedded": the embedded default dataset (`delg_tf.data.embedded`) is built
  (cached) under `data_dir`.
  - DELG: turned into TFRecords with `delg_tf.data.build_tfrecords` (80/20
    train/val split of all landmarks), then read through the same GLDv2 reader:
    the real-data path is exercised end to end (its retrieval benchmark is query
    vs database views of the same landmarks). With `embedded_train_landmarks=N`
    only the landmarks with id < N are in the TFRecords (own folder), so the
    queries of the others are unseen landmarks (`configs/demo.flags`, the paper's
    setting: trained on GLDv2, tested on Oxford/Paris).
  - Glocal (metric learning): only the *training* landmarks of
    `delg_tf.data.cub.embedded_metric_split` (the first half); the other half is
    the unseen test set of Recall@K (`delg_tf.evaluation.glocal`). 20% of the
    training-landmark views (per landmark) are held out for validation.
* "cub": CUB-200-2011 (`delg_tf.data.cub`), classes 1-100 for training.

All batches are (images float32 [B, H, W, 3] in [0, 255], labels int32 [B]).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

import tensorflow as tf

from delg_tf.data.errors import DataError
from delg_tf.training.config import TrainConfig

logger = logging.getLogger(__name__)

EMBEDDED_SUBDIR = "embedded"
TFRECORD_SUFFIX = "tfrecords"
EMBEDDED_NUM_SHARDS = 4
# TFRecords of a subset of the landmarks (`embedded_train_landmarks`): fewer images.
EMBEDDED_SUBSET_NUM_SHARDS = 2
LANDMARK_COLUMN = "landmark_id"
EMBEDDED_SPLIT_SEED = 0
# The paper's split of the landmark training set (Sec. 4.1).
VALIDATION_FRACTION = 0.2


@dataclasses.dataclass
class TrainData:
    """Datasets handed to the trainer.

    Attributes:
        train: batched, repeated dataset of (images, labels), global batch size.
        validation: batched finite dataset of (images, labels), or None.
        num_classes: number of classes of the training labels (None = unknown).
        description: one line saying where the data comes from (for the log).
        num_examples: training examples per epoch, when known.
    """

    train: tf.data.Dataset
    validation: Optional[tf.data.Dataset]
    num_classes: Optional[int]
    description: str
    num_examples: Optional[int] = None


def _summary(pattern: str) -> dict:
    """The TFRecord builder's build_summary.json beside the shards ({} if absent)."""
    from delg_tf.data import gldv2

    for folder in sorted({Path(p).parent for p in tf.io.gfile.glob(pattern)}):
        path = folder / gldv2.BUILD_SUMMARY_FILE
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return {}
    return {}


def _gldv2_datasets(
    config: TrainConfig, seed: int, train_pattern, validation_pattern, num_classes=None
) -> TrainData:
    from delg_tf.data import gldv2

    train = gldv2.make_dataset(
        train_pattern,
        config.batch_size,
        image_size=config.image_size,
        augment=config.augment,
        shuffle=True,
        seed=seed,
        repeat=True,
        drop_remainder=True,
        flag_name="train_file_pattern",
    )
    validation = None
    if validation_pattern and config.validation_interval > 0:
        validation = gldv2.make_dataset(
            validation_pattern,
            config.batch_size,
            image_size=config.image_size,
            augment=False,
            shuffle=False,
            seed=seed,
            repeat=False,
            drop_remainder=False,
            flag_name="validation_file_pattern",
        )
    if num_classes is None and config.num_classes is None:
        # Never scan the records (GLDv2 is ~1.2M images): metadata or --num_classes.
        num_classes = gldv2.infer_num_classes(train_pattern, "train_file_pattern", scan=False)
    summary = _summary(train_pattern)
    return TrainData(
        train=train,
        validation=validation,
        num_classes=num_classes or config.num_classes,
        description=f"GLDv2 TFRecords --train_file_pattern={train_pattern}",
        num_examples=summary.get("num_train"),
    )


def embedded_tfrecords_dir(data_dir, preset: str, train_landmarks: int = 0) -> Path:
    """Shard folder of the embedded TFRecords (all landmarks, or ids < `train_landmarks`)."""
    root = embedded_root(data_dir, preset)
    subset = f"-landmarks-lt{train_landmarks}" if train_landmarks else ""
    return Path(data_dir) / f"{root.name}{subset}-{TFRECORD_SUFFIX}"


def write_landmark_subset_csv(train_csv, train_landmarks: int, output_csv) -> int:
    """Writes the rows of `train_csv` whose landmark id is < `train_landmarks`.

    Returns:
        The number of rows kept.

    Raises:
        DataError: no row kept (naming the flag and the fix).
    """
    import csv

    with open(train_csv, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fieldnames = reader.fieldnames
        kept = [row for row in reader if int(row[LANDMARK_COLUMN]) < train_landmarks]
    if not kept:
        raise DataError(
            f"--embedded_train_landmarks={train_landmarks} keeps no training view "
            f"of {train_csv}; use a value >= 1 (0 = all landmarks)."
        )
    with open(output_csv, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames, lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept)
    return len(kept)


def _embedded_tfrecords(config: TrainConfig) -> Path:
    """Builds (once) the embedded dataset and its TFRecords (of the landmarks with id <
    `embedded_train_landmarks`, or all); returns the shard folder.
    """
    from delg_tf.data import build_tfrecords, embedded, gldv2

    data_dir = config.resolved_data_dir
    landmarks = config.embedded_train_landmarks
    output = embedded_tfrecords_dir(data_dir, config.embedded_preset, landmarks)
    if (output / gldv2.BUILD_SUMMARY_FILE).is_file():
        logger.info("embedded TFRecords already built in %s", output)
        return output
    paths = embedded.build_embedded_dataset(
        embedded_root(data_dir, config.embedded_preset), preset=config.embedded_preset
    )
    # Built aside and renamed, so a killed build never looks complete.
    tmp = data_dir / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    train_csv, num_shards = paths.train_csv, EMBEDDED_NUM_SHARDS
    if landmarks:
        train_csv, num_shards = tmp / "train.csv", EMBEDDED_SUBSET_NUM_SHARDS
        write_landmark_subset_csv(paths.train_csv, landmarks, train_csv)
    shards = tmp / "shards"
    build_tfrecords.build_tfrecords(
        build_tfrecords.BuildConfig(
            train_csv_path=str(train_csv),
            train_directory=str(paths.train_images_dir),
            output_directory=str(shards),
            num_shards=num_shards,
            validation_split_proportion=VALIDATION_FRACTION,
            seed=EMBEDDED_SPLIT_SEED,
        )
    )
    try:
        os.rename(shards, output)
    except OSError:
        if not (output / gldv2.BUILD_SUMMARY_FILE).is_file():
            raise
        # Built concurrently by another run: keep that one.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output


def embedded_root(data_dir, preset: str) -> Path:
    """Folder of the embedded dataset built by the trainer under `data_dir`."""
    return Path(data_dir) / f"{EMBEDDED_SUBDIR}-{preset}"


def embedded_metric_paths(data_dir, preset: str):
    """Builds (once, cached) the embedded dataset under `data_dir`; returns its paths."""
    from delg_tf.data import embedded

    return embedded.build_embedded_dataset(embedded_root(data_dir, preset), preset=preset)


def metric_resize_size(image_size: int) -> int:
    """Test-time shorter side before the centre crop: 256/224 of the crop side."""
    from delg_tf.data import cub

    return int(round(image_size * cub.METRIC_RESIZE_SIZE / cub.METRIC_IMAGE_SIZE))


def split_holdout(split, fraction: float, seed: int):
    """Splits a `MetricSplit` per class into (train, held-out) parts.

    Every class keeps at least one training image; `round(fraction * n)` of its n
    images (at most n - 1) are held out, chosen with `seed`. Labels are unchanged.

    Returns:
        (train MetricSplit, held-out MetricSplit or None when nothing is held out).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    held = np.zeros(len(split), bool)
    for label in np.unique(split.labels):
        members = np.flatnonzero(split.labels == label)
        count = min(int(round(fraction * len(members))), len(members) - 1)
        held[rng.choice(members, count, replace=False)] = True

    def part(mask, suffix):
        return dataclasses.replace(
            split,
            name=f"{split.name}{suffix}",
            paths=[p for p, m in zip(split.paths, mask) if m],
            labels=split.labels[mask],
        )

    return part(~held, ""), (part(held, "-validation") if held.any() else None)


def _metric_training_dataset(split, config: TrainConfig, seed: int):
    """The shuffled, augmented, repeated Glocal training batches of a metric split."""
    from delg_tf.data import cub

    return cub.make_metric_dataset(
        split,
        config.batch_size,
        training=True,
        seed=seed,
        image_size=config.image_size,
        resize_size=metric_resize_size(config.image_size),
        drop_remainder=True,
    )


def _embedded_metric_datasets(config: TrainConfig, seed: int) -> TrainData:
    """Glocal on the embedded dataset: training landmarks only (metric-learning split)."""
    from delg_tf.data import cub

    paths = embedded_metric_paths(config.resolved_data_dir, config.embedded_preset)
    split = cub.embedded_metric_split(paths, "train")
    train_split, validation_split = split_holdout(split, VALIDATION_FRACTION, EMBEDDED_SPLIT_SEED)
    train = _metric_training_dataset(train_split, config, seed)
    validation = None
    if validation_split is not None and config.validation_interval > 0:
        validation = cub.make_metric_dataset(
            validation_split,
            config.batch_size,
            training=False,
            image_size=config.image_size,
            resize_size=metric_resize_size(config.image_size),
            repeat=False,
            drop_remainder=False,
        )
    return TrainData(
        train=train,
        validation=validation,
        num_classes=split.num_classes,
        description=(
            f"embedded dataset ({config.embedded_preset}) training landmarks "
            f"{split.class_ids} ({len(train_split)} views; "
            f"{len(validation_split) if validation_split else 0} held out for "
            f"validation; the other landmarks are the unseen test classes) "
            f"in {paths.root}"
        ),
        num_examples=len(train_split),
    )


def _embedded_datasets(config: TrainConfig, seed: int) -> TrainData:
    if config.model_family == "glocal":
        return _embedded_metric_datasets(config, seed)
    output = _embedded_tfrecords(config)
    data = _gldv2_datasets(config, seed, str(output / "train-*"), str(output / "validation-*"))
    subset = (
        f" landmarks < {config.embedded_train_landmarks}" if config.embedded_train_landmarks else ""
    )
    data.description = f"embedded dataset ({config.embedded_preset}){subset} TFRecords in {output}"
    return data


def _cub_datasets(config: TrainConfig, seed: int) -> TrainData:
    """CUB-200-2011 classes 1-100 (metric-learning split). No validation batches:
    the test classes are unseen, Recall@K is `delg_tf.evaluation.glocal`'s job.
    """
    from delg_tf.data import cub

    split = cub.load_cub(config.data_dir, "train", flag="data_dir")
    train = _metric_training_dataset(split, config, seed)
    return TrainData(
        train=train,
        validation=None,
        num_classes=len(set(split.labels)),
        description=f"CUB-200-2011 train split at --data_dir={config.data_dir}",
        num_examples=len(split),
    )


def make_train_data(config: TrainConfig, seed: int) -> TrainData:
    """Builds the datasets named by `config.data_source`.

    Args:
        config: validated training config.
        seed: data-order/augmentation seed (the trainer varies it on resume when
            the iterator position cannot be restored).

    Raises:
        DataError: missing/empty data, naming the flag and the fix.
    """
    if config.data_source == "gldv2":
        return _gldv2_datasets(
            config, seed, config.train_file_pattern, config.validation_file_pattern
        )
    if config.data_source == "embedded":
        return _embedded_datasets(config, seed)
    return _cub_datasets(config, seed)
