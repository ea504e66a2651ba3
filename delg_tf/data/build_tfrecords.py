r"""Builds GLDv2-format TFRecords from a GLDv2-style CSV and an image folder.

Usage:
    python -m delg_tf.data.build_tfrecords \\
        --train_csv_path=/data/gldv2/train.csv \\
        --train_directory=/data/gldv2/train \\
        --output_directory=/data/gldv2/tfrecord \\
        --num_shards=128 --validation_split_proportion=0.2 --seed=0

Mirrors the official DELF `build_image_dataset.py` (record format in
`delg_tf.data.gldv2`):
* input: `train.csv` with columns `id,url,landmark_id` (or, with
  `--train_clean_csv_path`, GLDv2-clean's `landmark_id,images`), images at
  `<train_directory>/<id>.jpg` (flat, as the official builder globs) or in
  GLDv2's nested layout `<train_directory>/<a>/<b>/<c>/<id>.jpg`;
* split: per landmark, shuffle with `RandomState(MT19937(SeedSequence(seed)))`
  and put `max(1, int(p * n))` images in validation, the rest in train (the
  official algorithm; a landmark with one image goes to validation only);
* labels: relabelled to contiguous 0..C-1 in sorted landmark-id order with the
  mapping written to `relabeling.csv` (`new_label,old_label`), as the official
  builder does for the clean CSV; `--norelabel` keeps raw landmark ids;
* shards `validation-%05d-of-%05d` and `train-%05d-of-%05d` split with
  `np.linspace` like the official builder.
Deviations (documented): records are shuffled within a split before sharding
(the official shards are sorted by label, which a 100-record shuffle buffer
cannot mix); non-JPEG or non-RGB images are re-encoded as RGB JPEG (quality
95) instead of failing; missing/corrupt images are listed in
`missing_images.txt` / `bad_images.txt` and refused unless
`--max_skipped_fraction` allows them. `build_summary.json` (counts,
num_classes) is written last.

Flags live only in this entry module; `build_tfrecords(BuildConfig)` is the
library function.
"""

import csv
import dataclasses
import io
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from delg_tf import atomic
from delg_tf.data.errors import DataError, ImageLoadError

logger = logging.getLogger(__name__)

DEFAULT_NUM_SHARDS = 128
DEFAULT_VALIDATION_PROPORTION = 0.2
REENCODE_JPEG_QUALITY = 95
MISSING_LIST = "missing_images.txt"
BAD_LIST = "bad_images.txt"
_GLDV2_NESTING_DEPTH = 3
_LOG_EVERY = 1000


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """Parameters of `build_tfrecords` (one per command-line flag).

    Attributes:
        train_csv_path: GLDv2 train.csv (id,url,landmark_id).
        train_directory: folder of <id>.jpg images (flat or GLDv2-nested).
        output_directory: where shards and metadata are written.
        num_shards: shards per split.
        validation_split_proportion: fraction of each landmark's images put
            in the validation split; 0 writes a single train split.
        seed: split (and within-split shuffle) seed.
        train_clean_csv_path: optional GLDv2-clean CSV (landmark_id,images)
            restricting the images; then train_csv_path is not read.
        relabel: map landmark ids to contiguous labels (relabeling.csv).
        max_skipped_fraction: largest accepted fraction of listed images that
            are missing or unreadable (skipped and listed).
        shuffle_within_split: shuffle records before sharding.
    """

    train_csv_path: str
    train_directory: str
    output_directory: str
    num_shards: int = DEFAULT_NUM_SHARDS
    validation_split_proportion: float = DEFAULT_VALIDATION_PROPORTION
    seed: int = 0
    train_clean_csv_path: str = None
    relabel: bool = True
    max_skipped_fraction: float = 0.0
    shuffle_within_split: bool = True


def _check_config(config):
    if config.num_shards < 1:
        raise DataError(f"--num_shards must be >= 1, got {config.num_shards}")
    if not 0.0 <= config.validation_split_proportion < 1.0:
        raise DataError(
            "--validation_split_proportion must be in [0, 1), got "
            f"{config.validation_split_proportion}"
        )
    if not 0.0 <= config.max_skipped_fraction <= 1.0:
        raise DataError(
            f"--max_skipped_fraction must be in [0, 1], got {config.max_skipped_fraction}"
        )
    if not config.train_directory or not os.path.isdir(config.train_directory):
        raise DataError(
            f"--train_directory={config.train_directory} is not a "
            "folder: expected the folder of <id>.jpg images"
        )
    if not config.output_directory:
        raise DataError(
            "--output_directory is empty: expected the folder to write the TFRecord shards to"
        )


def _csv_rows(path, flag_name, columns, what, listed_columns):
    """Yields (line number, row dict) of a CSV whose header has `columns`.

    Args:
        what: the file named in errors ("GLDv2's train.csv").
        listed_columns: the columns named in errors ("id,url,landmark_id").

    Raises:
        DataError: the file is missing or its header lacks one of `columns`.
    """
    if not path or not os.path.isfile(path):
        raise DataError(
            f"--{flag_name}={path} not found: expected {what} with columns {listed_columns}"
        )
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        if any(column not in fields for column in columns):
            raise DataError(
                f"--{flag_name}={path}: header is {fields}, expected columns {listed_columns}"
            )
        yield from enumerate(reader, start=2)


def _landmark_id(row, path, flag_name, line):
    """The integer `landmark_id` of a CSV row, or a DataError naming the line."""
    try:
        return int(row["landmark_id"])
    except (TypeError, ValueError):
        raise DataError(
            f"--{flag_name}={path} line {line}: "
            f"landmark_id {row['landmark_id']!r} is not "
            "an integer"
        ) from None


def read_train_csv(path, flag_name="train_csv_path"):
    """Reads a GLDv2 train.csv.

    Args:
        path: CSV with a header containing `id` and `landmark_id`.
        flag_name: flag named in errors.

    Returns:
        list of (image_id str, landmark_id int) in file order.

    Raises:
        DataError: missing file, wrong header, bad label, duplicate id.
    """
    rows, seen = [], set()
    for line, row in _csv_rows(
        path, flag_name, ("id", "landmark_id"), "GLDv2's train.csv", "id,url,landmark_id"
    ):
        image_id = (row["id"] or "").strip()
        label = _landmark_id(row, path, flag_name, line)
        if not image_id:
            raise DataError(f"--{flag_name}={path} line {line}: empty id")
        if image_id in seen:
            raise DataError(f"--{flag_name}={path} line {line}: duplicate id {image_id}")
        seen.add(image_id)
        rows.append((image_id, label))
    if not rows:
        raise DataError(f"--{flag_name}={path} lists no image")
    return rows


def read_clean_csv(path, flag_name="train_clean_csv_path"):
    """Reads GLDv2-clean's CSV (`landmark_id,images`, ids space-separated).

    Returns:
        list of (image_id, landmark_id) in file order.
    """
    rows = []
    for line, row in _csv_rows(
        path, flag_name, ("landmark_id", "images"), "GLDv2's train_clean.csv", "landmark_id,images"
    ):
        label = _landmark_id(row, path, flag_name, line)
        rows.extend((image_id, label) for image_id in (row["images"] or "").split())
    if not rows:
        raise DataError(f"--{flag_name}={path} lists no image")
    return rows


def find_image(directory, image_id):
    """Path of `<id>.jpg` in `directory` (flat or GLDv2 a/b/c nesting).

    Returns:
        str path, or None when absent.
    """
    flat = os.path.join(directory, f"{image_id}.jpg")
    if os.path.isfile(flat):
        return flat
    if len(image_id) >= _GLDV2_NESTING_DEPTH:
        nested = os.path.join(directory, *image_id[:_GLDV2_NESTING_DEPTH], f"{image_id}.jpg")
        if os.path.isfile(nested):
            return nested
    return None


def split_train_validation(labels, proportion, seed):
    """Per-label train/validation split of the official builder.

    For each label in order of first appearance, shuffle its image indices
    with one shared `RandomState(MT19937(SeedSequence(seed)))` and send the
    first `max(1, int(proportion * n))` to validation.

    Args:
        labels: sequence of labels, one per image.
        proportion: validation fraction in (0, 1).
        seed: int.

    Returns:
        (validation_indices, train_indices): lists of int.
    """
    by_label = {}
    for index, label in enumerate(labels):
        by_label.setdefault(label, []).append(index)
    rs = np.random.RandomState(np.random.MT19937(np.random.SeedSequence(seed)))
    validation, train = [], []
    for indices in by_label.values():
        order = np.arange(len(indices))
        rs.shuffle(order)
        shuffled = [indices[i] for i in order]
        cutoff = max(1, int(proportion * len(indices)))
        validation.extend(shuffled[:cutoff])
        train.extend(shuffled[cutoff:])
    return validation, train


def relabeling_rules(labels):
    """Contiguous labels in sorted landmark-id order: {old: new}."""
    return {old: new for new, old in enumerate(sorted(set(labels)))}


def encode_for_record(path):
    """JPEG bytes and size of an image for a record.

    RGB JPEGs are stored byte for byte (as the official builder); other
    formats/modes are decoded robustly and re-encoded as RGB JPEG.

    Returns:
        (jpeg_bytes, height, width).

    Raises:
        ImageLoadError: unusable image (see delg_tf.data.images).
    """
    from PIL import Image
    from delg_tf.data.images import load_image_rgb

    array = load_image_rgb(path)
    height, width = array.shape[:2]
    with Image.open(path) as image:
        is_rgb_jpeg = image.format == "JPEG" and image.mode == "RGB"
    if is_rgb_jpeg:
        with open(path, "rb") as f:
            return f.read(), height, width
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=REENCODE_JPEG_QUALITY)
    return buffer.getvalue(), height, width


def _remove_old_shards(output_directory):
    from delg_tf.data import gldv2

    for split in (gldv2.TRAIN_SPLIT, gldv2.VALIDATION_SPLIT):
        for old in Path(output_directory).glob(f"{split}-?????-of-?????"):
            logger.info("removing old shard %s", old)
            old.unlink()


def write_split(split, records, output_directory, num_shards):
    """Writes one split's records into `num_shards` shards (atomic renames).

    Args:
        split: "train" or "validation".
        records: list of (image_id, jpeg_bytes_loader, label), where
            jpeg_bytes_loader() returns (bytes, height, width).
        output_directory: destination folder.
        num_shards: number of shards.

    Returns:
        list of shard paths.
    """
    import tensorflow as tf
    from delg_tf.data import gldv2

    spacing = np.linspace(0, len(records), num_shards + 1).astype(int)
    paths = []
    for shard in range(num_shards):
        path = os.path.join(output_directory, gldv2.shard_name(split, shard, num_shards))
        with atomic.atomic_path(path) as tmp, tf.io.TFRecordWriter(str(tmp)) as writer:
            for image_id, encoded, height, width, label in records[
                spacing[shard] : spacing[shard + 1]
            ]:
                example = gldv2.make_example(image_id, encoded, height, width, label)
                writer.write(example.SerializeToString())
        paths.append(path)
    logger.info("wrote %d %s records in %d shards", len(records), split, num_shards)
    return paths


def _load_images(rows, directory):
    """Encodes every listed image; returns (records, missing, bad)."""
    records, missing, bad = [], [], []
    started = time.time()
    for count, (image_id, label) in enumerate(rows, 1):
        path = find_image(directory, image_id)
        if path is None:
            missing.append(image_id)
            continue
        try:
            encoded, height, width = encode_for_record(path)
        except ImageLoadError as e:
            bad.append(f"{image_id}\t{e}")
            continue
        records.append((image_id, encoded, height, width, label))
        if count % _LOG_EVERY == 0:
            logger.info("read %d/%d images (%.0f s)", count, len(rows), time.time() - started)
    return records, missing, bad


def _write_lines(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(f"{line}\n" for line in lines)


def _config_key(config):
    """The config fields that determine the shards' content (for reuse)."""
    key = dataclasses.asdict(config)
    key.pop("output_directory")
    for name in ("train_csv_path", "train_directory", "train_clean_csv_path"):
        if key[name]:
            key[name] = os.path.abspath(key[name])
    return key


def read_build_summary(output_directory):
    """build_summary.json of a finished build, or None."""
    path = Path(output_directory) / "build_summary.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def ensure_tfrecords(config):
    """`build_tfrecords` unless the output already holds the same build.

    The build happens in `<output>.tmp-<pid>` renamed to the output at the
    end, so concurrent or killed runs never leave a half-written folder that
    looks finished.

    Args:
        config: BuildConfig; `output_directory` must not exist or hold a
            previous build (build_summary.json).

    Returns:
        Path of the output directory.
    """
    output = Path(config.output_directory).absolute()
    summary = read_build_summary(output)
    if summary is not None and summary.get("config") == _config_key(config):
        logger.info("TFRecords already built in %s", output)
        return output
    if output.exists() and summary is None and any(output.iterdir()):
        raise DataError(
            f"--output_directory={output} exists and holds no "
            "finished TFRecord build; remove it or choose another"
        )
    tmp = output.parent / f"{output.name}.tmp-{os.getpid()}"
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build_tfrecords(dataclasses.replace(config, output_directory=str(tmp)))
        if output.exists():
            logger.info("replacing the previous build in %s", output)
            shutil.rmtree(output)
        try:
            os.rename(tmp, output)
        except OSError:
            done = read_build_summary(output)
            if done is None or done.get("config") != _config_key(config):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output


def build_tfrecords(config):
    """Builds train (and validation) TFRecord shards.

    Args:
        config: BuildConfig.

    Returns:
        Path of the output directory, holding `train-*-of-*`,
        `validation-*-of-*` (unless the proportion is 0), `relabeling.csv`
        (if relabelled), `build_summary.json` and the skip lists.

    Raises:
        DataError: missing CSV/folder, no usable image, too many skipped.
    """
    _check_config(config)
    if config.train_clean_csv_path:
        rows = read_clean_csv(config.train_clean_csv_path)
    else:
        rows = read_train_csv(config.train_csv_path)
    output = Path(config.output_directory)
    output.mkdir(parents=True, exist_ok=True)
    logger.info("reading %d images listed in the CSV from %s", len(rows), config.train_directory)
    records, missing, bad = _load_images(rows, config.train_directory)
    _write_lines(output / MISSING_LIST, missing)
    _write_lines(output / BAD_LIST, bad)
    skipped = len(missing) + len(bad)
    if skipped:
        logger.warning(
            "skipping %d missing and %d unreadable images (listed in %s and %s)",
            len(missing),
            len(bad),
            output / MISSING_LIST,
            output / BAD_LIST,
        )
    if not records:
        raise DataError(
            f"no usable image: none of the {len(rows)} ids of the "
            f"CSV has a readable <id>.jpg in --train_directory="
            f"{config.train_directory} (see "
            f"{output / MISSING_LIST} and {output / BAD_LIST})"
        )
    if skipped > config.max_skipped_fraction * len(rows):
        example = missing[0] if missing else bad[0].split("\t")[0]
        raise DataError(
            f"{skipped} of {len(rows)} images listed in the CSV are missing "
            f"({len(missing)}) or unreadable ({len(bad)}) in --train_directory"
            f"={config.train_directory} (first: {example}; lists in "
            f"{output}); add them or pass --max_skipped_fraction="
            f"{skipped / len(rows):.3f} or more to skip them"
        )

    labels = [r[4] for r in records]
    summary = {
        "num_images": len(records),
        "num_missing": len(missing),
        "num_bad": len(bad),
        "seed": config.seed,
        "num_shards": config.num_shards,
        "validation_split_proportion": config.validation_split_proportion,
    }
    if config.relabel:
        rules = relabeling_rules(labels)
        with open(output / "relabeling.csv", "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["new_label", "old_label"])
            for old, new in rules.items():
                writer.writerow([new, old])
        records = [r[:4] + (rules[r[4]],) for r in records]
        summary["num_classes"] = len(rules)
    else:
        summary["num_classes"] = max(labels) + 1
    summary["num_landmarks"] = len(set(labels))

    if config.validation_split_proportion > 0:
        val_idx, train_idx = split_train_validation(
            [r[4] for r in records], config.validation_split_proportion, config.seed
        )
        splits = {"validation": val_idx, "train": train_idx}
    else:
        splits = {"train": list(range(len(records)))}
    _remove_old_shards(output)
    shuffle_rng = np.random.default_rng(config.seed)
    for split, indices in splits.items():
        if config.shuffle_within_split:
            indices = [indices[i] for i in shuffle_rng.permutation(len(indices))]
        write_split(split, [records[i] for i in indices], output, config.num_shards)
        summary[f"num_{split}"] = len(indices)
        # Relative to the output directory, so the folder can be moved.
        summary[f"{split}_files"] = f"{split}-*-of-{config.num_shards:05d}"
    summary["config"] = _config_key(config)
    atomic.write_json_atomic(summary, output / "build_summary.json", indent=1, sort_keys=True)
    logger.info("TFRecords ready in %s: %s", output, summary)
    return output


EMBEDDED_TFRECORDS_DIR = "tfrecords"
EMBEDDED_NUM_SHARDS = 4


def embedded_tfrecords(
    paths,
    num_shards=EMBEDDED_NUM_SHARDS,
    validation_split_proportion=DEFAULT_VALIDATION_PROPORTION,
    seed=0,
):
    """TFRecords of a built embedded dataset (built once, then reused).

    Args:
        paths: EmbeddedDatasetPaths (see delg_tf.data.embedded).
        num_shards: shards per split.
        validation_split_proportion: validation fraction per landmark.
        seed: split seed.

    Returns:
        Path of `<root>/tfrecords` holding `train-*-of-*`,
        `validation-*-of-*`, `relabeling.csv`, `build_summary.json`.
    """
    return ensure_tfrecords(
        BuildConfig(
            train_csv_path=str(paths.train_csv),
            train_directory=str(paths.train_images_dir),
            output_directory=str(paths.root / EMBEDDED_TFRECORDS_DIR),
            num_shards=num_shards,
            validation_split_proportion=validation_split_proportion,
            seed=seed,
        )
    )


# --------------------------------------------------------------------------
# Command line (absl flags only here)
# --------------------------------------------------------------------------


def _define_flags(flag_values):
    from absl import flags

    fv = dict(flag_values=flag_values)
    flags.DEFINE_string("train_csv_path", None, "GLDv2 train.csv (id,url,landmark_id).", **fv)
    flags.DEFINE_string("train_directory", None, "Folder of <id>.jpg training images.", **fv)
    flags.DEFINE_string("output_directory", None, "Output folder of the TFRecord shards.", **fv)
    flags.DEFINE_string(
        "train_clean_csv_path", None, "Optional GLDv2-clean CSV (landmark_id,images).", **fv
    )
    flags.DEFINE_integer("num_shards", DEFAULT_NUM_SHARDS, "Number of shards per split.", **fv)
    flags.DEFINE_float(
        "validation_split_proportion",
        DEFAULT_VALIDATION_PROPORTION,
        "Fraction of each landmark's images in the validation split (0 = no validation split).",
        **fv,
    )
    flags.DEFINE_alias(
        "validation_split_size", "validation_split_proportion", flag_values=flag_values
    )
    flags.DEFINE_integer("seed", 0, "Seed of the train/validation split.", **fv)
    flags.DEFINE_boolean("relabel", True, "Relabel landmark ids to contiguous labels.", **fv)
    flags.DEFINE_float(
        "max_skipped_fraction", 0.0, "Largest accepted fraction of missing/unreadable images.", **fv
    )
    flags.DEFINE_boolean(
        "shuffle_within_split", True, "Shuffle records within a split before sharding.", **fv
    )


def parse_flags(argv):
    """Parses command-line arguments into a BuildConfig.

    Args:
        argv: full argv (argv[0] is the program name); --flagfile works.

    Returns:
        BuildConfig.

    Raises:
        DataError: unknown flag, bad value or missing required flag.
    """
    from absl import flags

    flag_values = flags.FlagValues()
    _define_flags(flag_values)
    try:
        flag_values(argv)
    except flags.Error as e:
        raise DataError(f"{e}; see `python -m delg_tf.data.build_tfrecords --helpfull`") from None
    for required in ("train_directory", "output_directory"):
        if not flag_values[required].value:
            raise DataError(f"--{required} is required")
    if not (flag_values.train_csv_path or flag_values.train_clean_csv_path):
        raise DataError("--train_csv_path (or --train_clean_csv_path) is required")
    names = [f.name for f in dataclasses.fields(BuildConfig)]
    return BuildConfig(**{name: flag_values[name].value for name in names})


def main(argv=None):
    """Entry point: parse flags, build, report errors on one line."""
    argv = sys.argv if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if any(a in ("--help", "-h", "--helpfull") for a in argv[1:]):
        from absl import flags

        flag_values = flags.FlagValues()
        _define_flags(flag_values)
        print(__doc__)
        print(flag_values.get_help())
        return 0
    try:
        output = build_tfrecords(parse_flags(argv))
    except DataError as e:
        from delg_tf.cli import print_error

        return print_error(e)
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
