"""Metric-learning datasets: CUB-200-2011, Cars196, Stanford Online Products,
and the embedded dataset's landmark split.

Standard metric-learning splits (used by proxy-anchor, Kim et al. CVPR 2020,
and the Glocal Retriever, Kim et al. Electronics 2023, sec. 4.1): the first
half of the classes trains, the second half tests (unseen classes):

* CUB-200-2011: classes 1-100 train (5,864 images), 101-200 test (5,924).
  Official folder layout (`CUB_200_2011.tgz`): `images.txt`
  ("<image_id> <relative path>"), `image_class_labels.txt`
  ("<image_id> <class_id>"), `images/<class folder>/<file>.jpg`.
  `train_test_split.txt` is the classification split and is NOT used.
* Cars196: classes 1-98 train, 99-196 test, from `cars_annos.mat`
  (fields relative_im_path, class) and `car_ims/`.
* Stanford Online Products: `Ebay_train.txt` (classes 1-11318) and
  `Ebay_test.txt` (11319-22634), header "image_id class_id super_class_id
  path".

`load_*` return a `MetricSplit` (paths and 0-based labels, no TensorFlow);
`make_metric_dataset` builds the tf.data pipeline: random resized crop 224 +
flip for training (optionally class-balanced: m images per class per batch),
resize 256 + centre crop 224 for testing. Images are float32 in [0, 255].
"""

import dataclasses
import os
from pathlib import Path

import numpy as np

from delg_tf.data.errors import DataError

CUB_DIR_NAME = "CUB_200_2011"
CUB_NUM_CLASSES = 200
CUB_TRAIN_CLASSES = range(1, 101)
CUB_URL = "https://data.caltech.edu/records/65de6-vzh50"
CARS_NUM_CLASSES = 196
CARS_TRAIN_MAX_CLASS = 98
SOP_TRAIN_FILE = "Ebay_train.txt"
SOP_TEST_FILE = "Ebay_test.txt"
SPLITS = ("train", "test")
METRIC_IMAGE_SIZE = 224
METRIC_RESIZE_SIZE = 256
DEFAULT_SHUFFLE_SEED = 0


@dataclasses.dataclass(frozen=True)
class MetricSplit:
    """One split of a metric-learning dataset.

    Attributes:
        name: dataset/split description, e.g. "cub200/train".
        paths: list of absolute image paths.
        labels: np.int64 [N] labels, contiguous 0..num_classes-1 in the split.
        class_ids: original class id of every label value (list, len C).
    """

    name: str
    paths: list
    labels: np.ndarray
    class_ids: list

    @property
    def num_classes(self):
        """Number of classes C in the split."""
        return len(self.class_ids)

    def __len__(self):
        return len(self.paths)


def _check_split(split):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _make_split(name, paths, raw_labels):
    """Relabels raw class ids to 0..C-1 (sorted) and packs a MetricSplit."""
    class_ids = sorted(set(raw_labels))
    index = {c: i for i, c in enumerate(class_ids)}
    labels = np.array([index[c] for c in raw_labels], np.int64)
    return MetricSplit(name=name, paths=list(paths), labels=labels, class_ids=class_ids)


def _check_files_exist(paths, dataset, flag):
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(
            f"{dataset}: {len(missing)} of {len(paths)} listed "
            f"images are missing (first: {missing[0]}); the "
            f"folder is incomplete: re-extract it or fix --{flag}"
        )


def _read_id_table(path, dataset, flag, fix):
    """Reads "<id> <value>" lines into {int id: str value}."""
    if not path.is_file():
        raise DataError(f"{dataset}: {path} not found; {fix}")
    table = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.strip().split(maxsplit=1)
            if len(parts) != 2 or not parts[0].isdigit():
                raise DataError(
                    f"{dataset}: {path} line {line_no}: expected "
                    f"'<id> <value>', got {line.strip()!r}; "
                    f"check --{flag}"
                )
            table[int(parts[0])] = parts[1]
    return table


def resolve_cub_root(cub_root, flag="cub_root"):
    """Finds the CUB_200_2011 folder (given it or its parent).

    Raises:
        DataError: not found, with what to download and which flag to set.
    """
    fix = (
        f"download CUB_200_2011.tgz (CUB-200-2011, Caltech: {CUB_URL}), "
        f"extract it and set --{flag}=/path/to/CUB_200_2011"
    )
    if not cub_root:
        raise DataError(f"no CUB-200-2011 folder given; {fix}")
    root = Path(cub_root).expanduser()
    for candidate in (root, root / CUB_DIR_NAME):
        if (candidate / "images.txt").is_file():
            return candidate
    raise DataError(
        f"CUB-200-2011 not found at --{flag}={cub_root} (expected"
        f" images.txt, image_class_labels.txt and images/); {fix}"
    )


def load_cub(cub_root, split, check_files=True, flag="cub_root"):
    """CUB-200-2011 metric-learning split (classes 1-100 / 101-200).

    Args:
        cub_root: CUB_200_2011 folder or its parent.
        split: "train" or "test".
        check_files: verify every image file exists.
        flag: flag named in errors.

    Returns:
        MetricSplit with labels 0..99.
    """
    _check_split(split)
    root = resolve_cub_root(cub_root, flag)
    fix = f"re-extract CUB_200_2011.tgz and check --{flag}"
    images = _read_id_table(root / "images.txt", "CUB-200-2011", flag, fix)
    classes = _read_id_table(root / "image_class_labels.txt", "CUB-200-2011", flag, fix)
    unlabelled = sorted(set(images) - set(classes))
    if unlabelled:
        raise DataError(
            f"CUB-200-2011: image id {unlabelled[0]} of "
            f"images.txt has no class in image_class_labels.txt; "
            f"{fix}"
        )
    train_classes = set(CUB_TRAIN_CLASSES)
    paths, raw = [], []
    for image_id in sorted(images):
        class_id = int(classes[image_id])
        if (class_id in train_classes) == (split == "train"):
            paths.append(str(root / "images" / images[image_id]))
            raw.append(class_id)
    if not paths:
        raise DataError(
            f"CUB-200-2011: no {split} image (classes "
            f"{'1-100' if split == 'train' else '101-200'}) in "
            f"{root}; {fix}"
        )
    if check_files:
        _check_files_exist(paths, "CUB-200-2011", flag)
    return _make_split(f"cub200/{split}", paths, raw)


def load_cars196(cars_root, split, check_files=True, flag="cars_root"):
    """Cars196 metric-learning split (classes 1-98 / 99-196).

    Expects `cars_annos.mat` and `car_ims/` in `cars_root`.

    Returns:
        MetricSplit with labels 0..97.
    """
    _check_split(split)
    root = Path(cars_root or "").expanduser()
    annos = root / "cars_annos.mat"
    if not annos.is_file():
        raise DataError(
            f"Cars196 not found at --{flag}={cars_root} (expected "
            "cars_annos.mat and car_ims/); download the Stanford "
            f"Cars dataset and set --{flag}"
        )
    from scipy.io import loadmat

    annotations = loadmat(str(annos))["annotations"][0]
    paths, raw = [], []
    for entry in annotations:
        rel = str(np.squeeze(entry["relative_im_path"]))
        class_id = int(np.squeeze(entry["class"]))
        if (class_id <= CARS_TRAIN_MAX_CLASS) == (split == "train"):
            paths.append(str(root / rel))
            raw.append(class_id)
    if check_files:
        _check_files_exist(paths, "Cars196", flag)
    return _make_split(f"cars196/{split}", paths, raw)


def load_sop(sop_root, split, check_files=True, flag="sop_root"):
    """Stanford Online Products split from Ebay_train.txt / Ebay_test.txt.

    Returns:
        MetricSplit (train: 11,318 classes; test: 11,316).
    """
    _check_split(split)
    root = Path(sop_root or "").expanduser()
    list_file = root / (SOP_TRAIN_FILE if split == "train" else SOP_TEST_FILE)
    if not list_file.is_file():
        raise DataError(
            f"Stanford Online Products not found at --{flag}="
            f"{sop_root} (expected {SOP_TRAIN_FILE}, "
            f"{SOP_TEST_FILE}); download Stanford_Online_Products "
            f"and set --{flag}"
        )
    paths, raw = [], []
    with open(list_file, encoding="utf-8") as f:
        header = f.readline().split()
        if header[:2] != ["image_id", "class_id"] or "path" not in header:
            raise DataError(
                f"{list_file}: header {header}, expected 'image_id class_id super_class_id path'"
            )
        path_col = header.index("path")
        for line in f:
            parts = line.split()
            if len(parts) < len(header):
                continue
            paths.append(str(root / parts[path_col]))
            raw.append(int(parts[1]))
    if check_files:
        _check_files_exist(paths, "Stanford Online Products", flag)
    return _make_split(f"sop/{split}", paths, raw)


def embedded_metric_split(paths_or_root, split, num_train_classes=None):
    """The embedded dataset as a metric-learning dataset (Glocal demo).

    Classes are the landmarks; the first `num_train_classes` (default half,
    rounded up) train, the others test. Images are the training views
    (`train/images/`, listed in train.csv) of each landmark.

    Args:
        paths_or_root: EmbeddedDatasetPaths or dataset root (built).
        split: "train" or "test".
        num_train_classes: number of training landmarks.

    Returns:
        MetricSplit with labels 0..C-1 of the split.
    """
    import csv
    from delg_tf.data.embedded import EmbeddedDatasetPaths

    _check_split(split)
    paths = (
        paths_or_root
        if isinstance(paths_or_root, EmbeddedDatasetPaths)
        else EmbeddedDatasetPaths.at(paths_or_root)
    )
    if not paths.train_csv.is_file():
        raise DataError(
            f"{paths.train_csv} not found: build the embedded "
            "dataset first (build_embedded_dataset(root))"
        )
    with open(paths.train_csv, encoding="utf-8", newline="") as f:
        rows = [(r["id"], int(r["landmark_id"])) for r in csv.DictReader(f)]
    landmarks = sorted({label for _, label in rows})
    if num_train_classes is None:
        num_train_classes = (len(landmarks) + 1) // 2
    if not 1 <= num_train_classes < len(landmarks):
        raise ValueError(
            f"num_train_classes must be in [1, {len(landmarks)}), got {num_train_classes}"
        )
    train_set = set(landmarks[:num_train_classes])
    chosen = [
        (str(paths.train_images_dir / f"{image_id}.jpg"), label)
        for image_id, label in rows
        if (label in train_set) == (split == "train")
    ]
    return _make_split(f"embedded/{split}", [p for p, _ in chosen], [label for _, label in chosen])


# --------------------------------------------------------------------------
# tf.data
# --------------------------------------------------------------------------


def balanced_batch_indices(labels, batch_size, samples_per_class, seed):
    """Endless class-balanced batches of indices (m images per class).

    Each batch holds `batch_size // samples_per_class` distinct classes drawn
    uniformly, and `samples_per_class` images of each (without replacement
    when the class has enough images).

    Args:
        labels: np.int64 [N].
        batch_size: B, a multiple of `samples_per_class`.
        samples_per_class: m.
        seed: int.

    Yields:
        np.int64 [B] index arrays.
    """
    labels = np.asarray(labels)
    if samples_per_class < 1 or batch_size % samples_per_class:
        raise ValueError(
            f"batch_size ({batch_size}) must be a multiple of "
            f"samples_per_class ({samples_per_class})"
        )
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    classes_per_batch = batch_size // samples_per_class
    if classes_per_batch > len(by_class):
        raise ValueError(
            f"a batch needs {classes_per_batch} classes but the "
            f"split has {len(by_class)}; lower batch_size or "
            "raise samples_per_class"
        )
    rng = np.random.default_rng(seed)
    while True:
        chosen = rng.choice(len(by_class), classes_per_batch, replace=False)
        batch = [
            rng.choice(by_class[c], samples_per_class, replace=len(by_class[c]) < samples_per_class)
            for c in chosen
        ]
        yield np.concatenate(batch).astype(np.int64)


def make_metric_dataset(
    split,
    batch_size,
    training,
    seed=DEFAULT_SHUFFLE_SEED,
    image_size=METRIC_IMAGE_SIZE,
    resize_size=METRIC_RESIZE_SIZE,
    samples_per_class=None,
    repeat=None,
    random_flip=True,
    drop_remainder=None,
):
    """tf.data pipeline of a MetricSplit.

    Args:
        split: MetricSplit.
        batch_size: B.
        training: random resized crop + flip (True) or resize + centre crop.
        seed: shuffling / sampling / augmentation seed.
        image_size: crop size (224).
        resize_size: test-time shorter side before the centre crop (256).
        samples_per_class: m for class-balanced batches (training only);
            None = plain shuffling.
        repeat: repeat forever; default = `training`.
        random_flip: horizontal flip in training.
        drop_remainder: default = `training`.

    Returns:
        tf.data.Dataset of (images float32 [B, S, S, 3] in [0, 255],
        labels int64 [B]); test order = split order.
    """
    import tensorflow as tf
    from delg_tf.data import augmentation

    if len(split) == 0:
        raise DataError(f"{split.name} has no image")
    repeat = training if repeat is None else repeat
    drop_remainder = training if drop_remainder is None else drop_remainder
    paths = tf.constant(split.paths)
    labels = tf.constant(split.labels, tf.int64)

    if training and samples_per_class:
        generator_seed = seed

        def index_stream():
            for batch in balanced_batch_indices(
                split.labels, batch_size, samples_per_class, generator_seed
            ):
                yield from batch

        dataset = tf.data.Dataset.from_generator(
            index_stream, output_signature=tf.TensorSpec([], tf.int64)
        )
    else:
        dataset = tf.data.Dataset.range(len(split))
        if training:
            dataset = dataset.shuffle(len(split), seed=seed, reshuffle_each_iteration=True)
        if repeat:
            dataset = dataset.repeat()

    def load(index, element):
        data = tf.io.read_file(tf.gather(paths, element))
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        image = tf.ensure_shape(image, [None, None, 3])
        if training:
            image = augmentation.metric_train_augment(
                image, augmentation.element_seed(seed, index), image_size, random_flip
            )
        else:
            image = augmentation.metric_eval_preprocess(image, resize_size, image_size)
        return image, tf.gather(labels, element)

    dataset = dataset.enumerate().map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    return dataset.prefetch(tf.data.AUTOTUNE)
