"""Google Landmarks v2 TFRecords: format, writer helpers and tf.data reader.

The record format is the official DELF builder's
(`delf/python/training/build_image_dataset.py`), read by the official reader
(`delf/python/datasets/google_landmarks_dataset/googlelandmarks.py`). Each
record is a `tf.train.Example` with:

    image/encoded      bytes   JPEG encoding of the RGB image
    image/height       int64   height in pixels
    image/width        int64   width in pixels
    image/colorspace   bytes   b"RGB"
    image/channels     int64   3
    image/format       bytes   b"JPEG"
    image/id           bytes   image id (file name without .jpg)
    image/class/label  int64   label (training splits only)

We also write `image/filename` (= the id; the official docstring lists it,
its reader parses it with a default), so our records are a superset that both
readers accept. Shards are named `<split>-%05d-of-%05d` (e.g.
`train-00000-of-00128`, `validation-00003-of-00128`).

`make_dataset` yields `(images, labels)`: images float32 [B, S, S, 3] with
values in [0, 255] (NOT normalised: the model applies its backbone's
normalisation), labels int64 [B].
"""

import csv
import glob
import json
import os

import tensorflow as tf

from delg_tf.data import augmentation
from delg_tf.data.errors import DataError

KEY_ENCODED = "image/encoded"
KEY_HEIGHT = "image/height"
KEY_WIDTH = "image/width"
KEY_COLORSPACE = "image/colorspace"
KEY_CHANNELS = "image/channels"
KEY_FORMAT = "image/format"
KEY_ID = "image/id"
KEY_FILENAME = "image/filename"
KEY_LABEL = "image/class/label"

COLORSPACE = "RGB"
CHANNELS = 3
IMAGE_FORMAT = "JPEG"
SHARD_NAME_FORMAT = "{split}-{shard:05d}-of-{num_shards:05d}"
TRAIN_SPLIT = "train"
VALIDATION_SPLIT = "validation"
TEST_SPLIT = "test"
RELABELING_FILE = "relabeling.csv"
BUILD_SUMMARY_FILE = "build_summary.json"
DEFAULT_SHUFFLE_BUFFER = 1000
DEFAULT_IMAGE_SIZE = augmentation.DELG_IMAGE_SIZE
_MAX_PARALLEL_FILES = 8
_BUILD_HINT = (
    "build them with `python -m delg_tf.data.build_tfrecords "
    "--train_csv_path=... --train_directory=... "
    "--output_directory=...`"
)

# The official reader's feature description (same keys and defaults).
FEATURE_DESCRIPTION = {
    KEY_HEIGHT: tf.io.FixedLenFeature([], tf.int64, default_value=0),
    KEY_WIDTH: tf.io.FixedLenFeature([], tf.int64, default_value=0),
    KEY_CHANNELS: tf.io.FixedLenFeature([], tf.int64, default_value=0),
    KEY_FORMAT: tf.io.FixedLenFeature([], tf.string, default_value=""),
    KEY_ID: tf.io.FixedLenFeature([], tf.string, default_value=""),
    KEY_FILENAME: tf.io.FixedLenFeature([], tf.string, default_value=""),
    KEY_ENCODED: tf.io.FixedLenFeature([], tf.string, default_value=""),
    KEY_LABEL: tf.io.FixedLenFeature([], tf.int64, default_value=0),
}


def shard_name(split, shard, num_shards):
    """Official shard file name, e.g. ``train-00000-of-00128`` for ("train", 0, 128)."""
    return SHARD_NAME_FORMAT.format(split=split, shard=shard, num_shards=num_shards)


def _int64_feature(value):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))


def _bytes_feature(value):
    if isinstance(value, str):
        value = value.encode("utf-8")
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def make_example(image_id, jpeg_bytes, height, width, label=None):
    """Builds one record in the official format.

    Args:
        image_id: str unique id (file name without extension).
        jpeg_bytes: JPEG encoding of an RGB image.
        height: image height in pixels.
        width: image width in pixels.
        label: int label, or None for test records (no label feature).

    Returns:
        tf.train.Example.
    """
    features = {
        KEY_HEIGHT: _int64_feature(height),
        KEY_WIDTH: _int64_feature(width),
        KEY_COLORSPACE: _bytes_feature(COLORSPACE),
        KEY_CHANNELS: _int64_feature(CHANNELS),
        KEY_FORMAT: _bytes_feature(IMAGE_FORMAT),
        KEY_ID: _bytes_feature(image_id),
        KEY_FILENAME: _bytes_feature(image_id),
        KEY_ENCODED: _bytes_feature(jpeg_bytes),
    }
    if label is not None:
        features[KEY_LABEL] = _int64_feature(label)
    return tf.train.Example(features=tf.train.Features(feature=features))


def parse_example(serialized):
    """Parses one serialized record with `FEATURE_DESCRIPTION`.

    Returns:
        dict key -> scalar tensor.
    """
    return tf.io.parse_single_example(serialized, FEATURE_DESCRIPTION)


def resolve_file_pattern(file_pattern, flag_name="file_pattern"):
    """Expands a (comma-separated) glob of TFRecord files and checks them.

    Args:
        file_pattern: glob such as "/data/gldv2/train-*", or several joined by
            commas.
        flag_name: the flag the pattern came from, named in errors.

    Returns:
        Sorted list of file paths (at least one non-empty file).

    Raises:
        DataError: empty pattern, no match, or only empty/unreadable files.
    """
    if not file_pattern or not str(file_pattern).strip():
        raise DataError(
            f"--{flag_name} is empty: expected a glob of GLDv2 "
            f"TFRecord shards such as /data/gldv2/train-*; "
            f"{_BUILD_HINT}"
        )
    files = []
    for pattern in str(file_pattern).split(","):
        files.extend(glob.glob(os.path.expanduser(pattern.strip())))
    files = sorted(set(f for f in files if os.path.isfile(f)))
    if not files:
        raise DataError(
            f"--{flag_name}={file_pattern} matches no file: "
            f"expected GLDv2 TFRecord shards; {_BUILD_HINT}"
        )
    unreadable = [f for f in files if not os.access(f, os.R_OK)]
    if unreadable:
        raise DataError(
            f"--{flag_name}={file_pattern}: cannot read "
            f"{unreadable[0]} ({len(unreadable)} unreadable "
            "files); fix the permissions"
        )
    if all(os.path.getsize(f) == 0 for f in files):
        raise DataError(
            f"--{flag_name}={file_pattern}: all {len(files)} "
            f"files are empty (no records); {_BUILD_HINT}"
        )
    return files


def check_first_record(files, flag_name="file_pattern"):
    """Parses the first record of the first non-empty file.

    Raises:
        DataError: the file is not a TFRecord of GLDv2 Examples.
    """
    first = next(f for f in files if os.path.getsize(f) > 0)
    try:
        for serialized in tf.data.TFRecordDataset([first]).take(1):
            parsed = parse_example(serialized)
            if not parsed[KEY_ENCODED].numpy():
                raise DataError(
                    f"--{flag_name}: {first} has records without "
                    f"{KEY_ENCODED}; expected the official DELF "
                    f"format; {_BUILD_HINT}"
                )
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(
            f"--{flag_name}: {first} is not a readable TFRecord "
            f"of tf.train.Example ({type(e).__name__}: "
            f"{message}); rebuild it: {_BUILD_HINT}"
        ) from None


def decode_image(encoded):
    """Decodes JPEG (or PNG) bytes to uint8 [H, W, 3]."""
    image = tf.io.decode_image(encoded, channels=CHANNELS, expand_animations=False)
    return tf.ensure_shape(image, [None, None, CHANNELS])


def _make_parse_fn(image_size, augment, base_seed, augmentation_config, with_ids):
    def parse(index, serialized):
        parsed = parse_example(serialized)
        image = decode_image(parsed[KEY_ENCODED])
        if augment:
            image = augmentation.augment_for_training(
                image, image_size, augmentation.element_seed(base_seed, index), augmentation_config
            )
        else:
            image = augmentation.resize_for_eval(image, image_size)
        label = parsed[KEY_LABEL]
        if with_ids:
            return image, label, parsed[KEY_ID]
        return image, label

    return parse


def make_dataset(
    file_pattern,
    batch_size,
    image_size=DEFAULT_IMAGE_SIZE,
    augment=True,
    shuffle=True,
    seed=0,
    repeat=True,
    shuffle_buffer=DEFAULT_SHUFFLE_BUFFER,
    augmentation_config=None,
    drop_remainder=None,
    with_ids=False,
    flag_name="file_pattern",
    check=True,
):
    """tf.data pipeline over GLDv2 TFRecords.

    Files are shuffled, read interleaved (deterministic order), records
    shuffled, decoded, augmented with per-element stateless seeds
    ([seed, element index]), batched and prefetched. Same seed and files give
    the same stream.

    Args:
        file_pattern: glob (or comma-separated globs) of TFRecord shards.
        batch_size: batch size B.
        image_size: output side S (512 for DELG).
        augment: training augmentation (random crop / aspect distortion as
            the official reader, see `augmentation.augment_for_training`);
            False resizes the full image to S x S like the official reader.
        shuffle: shuffle files and records.
        seed: int seed of shuffling and augmentation.
        repeat: repeat forever (training); False gives one epoch.
        shuffle_buffer: record shuffle buffer size.
        augmentation_config: augmentation.AugmentationConfig or None.
        drop_remainder: drop the last partial batch; default = `repeat`.
        with_ids: also yield the image ids (string [B]).
        flag_name: flag named in error messages.
        check: validate the files and the first record eagerly.

    Returns:
        tf.data.Dataset of (images float32 [B, S, S, 3] in [0, 255],
        labels int64 [B]) (+ ids string [B] if `with_ids`).

    Raises:
        DataError: no/empty/unreadable files (one line naming the pattern).
    """
    files = resolve_file_pattern(file_pattern, flag_name)
    if check:
        check_first_record(files, flag_name)
    if augmentation_config is None:
        augmentation_config = augmentation.AugmentationConfig()
    if drop_remainder is None:
        drop_remainder = repeat
    dataset = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
        dataset = dataset.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.interleave(
        tf.data.TFRecordDataset,
        cycle_length=min(len(files), _MAX_PARALLEL_FILES),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    if repeat:
        dataset = dataset.repeat()
    if shuffle:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.enumerate()
    dataset = dataset.map(
        _make_parse_fn(image_size, augment, seed, augmentation_config, with_ids),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    return dataset.prefetch(tf.data.AUTOTUNE)


def count_records(file_pattern, flag_name="file_pattern"):
    """Counts the records of all files matching `file_pattern` (full scan)."""
    files = resolve_file_pattern(file_pattern, flag_name)
    return int(
        tf.data.TFRecordDataset(files)
        .reduce(tf.constant(0, tf.int64), lambda count, _: count + 1)
        .numpy()
    )


def _labels_from_records(files):
    dataset = tf.data.TFRecordDataset(files).map(
        lambda s: tf.io.parse_single_example(s, {KEY_LABEL: FEATURE_DESCRIPTION[KEY_LABEL]})[
            KEY_LABEL
        ]
    )
    return dataset


def infer_num_classes(file_pattern, flag_name="file_pattern", scan=True):
    """Number of classes of a TFRecord dataset.

    Looks, next to the first shard, for the builder's `build_summary.json`
    (`num_classes`) or `relabeling.csv` (one row per class); otherwise, if
    `scan`, reads every label and returns max(label) + 1.

    Args:
        file_pattern: glob of shards.
        flag_name: flag named in errors.
        scan: allow the full scan fallback.

    Returns:
        int number of classes.

    Raises:
        DataError: no metadata and `scan` is False (set --num_classes).
    """
    files = resolve_file_pattern(file_pattern, flag_name)
    directory = os.path.dirname(files[0])
    summary_path = os.path.join(directory, BUILD_SUMMARY_FILE)
    if os.path.isfile(summary_path):
        with open(summary_path, encoding="utf-8") as f:
            summary = json.load(f)
        if summary.get("num_classes"):
            return int(summary["num_classes"])
    relabeling_path = os.path.join(directory, RELABELING_FILE)
    if os.path.isfile(relabeling_path):
        with open(relabeling_path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        return len(rows)
    if not scan:
        raise DataError(
            f"cannot tell the number of classes of "
            f"--{flag_name}={file_pattern} (no "
            f"{BUILD_SUMMARY_FILE} or {RELABELING_FILE} beside "
            "it); set --num_classes"
        )
    max_label = _labels_from_records(files).reduce(tf.constant(-1, tf.int64), tf.maximum)
    return int(max_label.numpy()) + 1
