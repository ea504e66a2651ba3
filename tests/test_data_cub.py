"""Metric-learning readers on tiny fake folders in the official layouts."""

import numpy as np
import pytest
from PIL import Image

from delg_tf.data import cub, embedded
from delg_tf.data.errors import DataError

IMAGE = np.random.default_rng(0).integers(0, 255, (40, 60, 3)).astype(np.uint8)


def _fake_cub(parent, num_classes=200):
    root = parent / "CUB_200_2011"
    (root / "images").mkdir(parents=True)
    images, labels, split = [], [], []
    image_id = 0
    for class_id in range(1, num_classes + 1):
        folder = f"{class_id:03d}.Bird_{class_id}"
        (root / "images" / folder).mkdir()
        for k in range(1 + class_id % 2):
            image_id += 1
            rel = f"{folder}/Bird_{class_id}_{k}.jpg"
            Image.fromarray(IMAGE).save(root / "images" / rel)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {class_id}")
            split.append(f"{image_id} {k % 2}")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    return root


@pytest.fixture(scope="module")
def fake_cub(tmp_path_factory):
    return _fake_cub(tmp_path_factory.mktemp("cub"))


def test_cub_standard_split(fake_cub):
    train = cub.load_cub(fake_cub, "train")
    test = cub.load_cub(fake_cub.parent, "test")  # parent folder works too
    assert train.class_ids == list(range(1, 101))
    assert test.class_ids == list(range(101, 201))
    assert train.num_classes == test.num_classes == 100
    assert set(train.labels.tolist()) == set(range(100))
    assert len(train) == 150 and len(test) == 150
    assert "/001.Bird_1/" in train.paths[0]
    assert not set(train.paths) & set(test.paths)


def test_cub_missing_folder_says_what_to_download(tmp_path):
    with pytest.raises(DataError) as info:
        cub.load_cub(tmp_path / "nowhere", "train")
    message = str(info.value)
    assert "CUB_200_2011.tgz" in message and "--cub_root" in message
    assert "\n" not in message
    with pytest.raises(DataError, match="--cub_root"):
        cub.load_cub(None, "train")


def test_cub_incomplete_folder(tmp_path):
    root = _fake_cub(tmp_path, num_classes=4)
    (root / "images" / "001.Bird_1" / "Bird_1_0.jpg").unlink()
    with pytest.raises(DataError, match="missing.*Bird_1_0"):
        cub.load_cub(root, "train")
    (root / "image_class_labels.txt").write_text("1 1\n")
    with pytest.raises(DataError, match="no class"):
        cub.load_cub(root, "train", check_files=False)
    (root / "image_class_labels.txt").unlink()
    with pytest.raises(DataError, match="image_class_labels.txt"):
        cub.load_cub(root, "train")


def test_balanced_batches():
    labels = np.repeat(np.arange(6), [1, 2, 3, 4, 5, 6])
    stream = cub.balanced_batch_indices(labels, 8, 2, seed=1)
    for _ in range(5):
        batch = next(stream)
        assert batch.shape == (8,)
        classes, counts = np.unique(labels[batch], return_counts=True)
        assert len(classes) == 4 and np.all(counts == 2)
    with pytest.raises(ValueError, match="multiple"):
        next(cub.balanced_batch_indices(labels, 7, 2, 0))
    with pytest.raises(ValueError, match="classes"):
        next(cub.balanced_batch_indices(labels, 16, 2, 0))


def test_metric_datasets(fake_cub):
    train = cub.load_cub(fake_cub, "train")
    ds = cub.make_metric_dataset(
        train, batch_size=6, training=True, samples_per_class=2, image_size=32
    )
    images, labels = next(iter(ds))
    assert images.shape == (6, 32, 32, 3) and labels.dtype.name == "int64"
    assert len(set(labels.numpy().tolist())) == 3
    assert 0 <= float(images.numpy().min()) <= float(images.numpy().max()) <= 255
    test = cub.load_cub(fake_cub, "test")
    ds = cub.make_metric_dataset(test, batch_size=64, training=False, image_size=32, resize_size=40)
    got = np.concatenate([lab.numpy() for _, lab in ds])
    np.testing.assert_array_equal(got, test.labels)
    plain = cub.make_metric_dataset(train, batch_size=4, training=True, image_size=32)
    assert next(iter(plain))[0].shape == (4, 32, 32, 3)


def test_embedded_metric_split(tmp_path):
    paths = embedded.build_embedded_dataset(tmp_path / "emb", preset="tiny")
    train = cub.embedded_metric_split(paths, "train")
    test = cub.embedded_metric_split(paths.root, "test")
    landmarks = embedded.PRESETS["tiny"]["num_landmarks"]
    views = embedded.PRESETS["tiny"]["num_train_views"]
    assert train.num_classes + test.num_classes == landmarks
    assert len(train) == train.num_classes * views
    assert not set(train.class_ids) & set(test.class_ids)
    with pytest.raises(ValueError):
        cub.embedded_metric_split(paths, "train", num_train_classes=landmarks)


def test_cars196_and_sop(tmp_path):
    from scipy.io import savemat

    cars = tmp_path / "cars"
    (cars / "car_ims").mkdir(parents=True)
    records = []
    for i, class_id in enumerate([1, 98, 99, 196]):
        rel = f"car_ims/{i:06d}.jpg"
        Image.fromarray(IMAGE).save(cars / rel)
        records.append((rel, class_id))
    annotations = np.array(records, dtype=[("relative_im_path", "O"), ("class", "O")])
    savemat(str(cars / "cars_annos.mat"), {"annotations": annotations[None]})
    train = cub.load_cars196(cars, "train")
    test = cub.load_cars196(cars, "test")
    assert train.class_ids == [1, 98] and test.class_ids == [99, 196]
    with pytest.raises(DataError, match="cars_annos.mat"):
        cub.load_cars196(tmp_path, "train")

    sop = tmp_path / "sop"
    (sop / "bicycle_final").mkdir(parents=True)
    Image.fromarray(IMAGE).save(sop / "bicycle_final" / "a.JPG")
    header = "image_id class_id super_class_id path\n"
    (sop / "Ebay_train.txt").write_text(header + "1 1 1 bicycle_final/a.JPG\n")
    (sop / "Ebay_test.txt").write_text(header)
    split = cub.load_sop(sop, "train")
    assert split.class_ids == [1] and split.paths[0].endswith("a.JPG")
    with pytest.raises(DataError, match="Ebay_train.txt"):
        cub.load_sop(tmp_path, "train")
