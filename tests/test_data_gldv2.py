"""TFRecord builder -> reader round trip, reader errors, official format."""

import csv
import shutil

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from delg_tf.data import build_tfrecords as btf
from delg_tf.data import embedded, gldv2
from delg_tf.data.errors import DataError
from delg_tf.data.testing import write_bad_image_corpus

OFFICIAL_KEYS = {
    "image/height",
    "image/width",
    "image/colorspace",
    "image/channels",
    "image/format",
    "image/id",
    "image/encoded",
    "image/class/label",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gld") / "tiny"
    return embedded.build_embedded_dataset(root, preset="tiny")


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("tfr")
    config = btf.BuildConfig(
        train_csv_path=str(tiny.train_csv),
        train_directory=str(tiny.train_images_dir),
        output_directory=str(out),
        num_shards=3,
    )
    assert btf.build_tfrecords(config) == out
    return out


def _csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_shards_and_official_keys(built):
    names = sorted(p.name for p in built.glob("*-of-*"))
    assert names == [f"{s}-{i:05d}-of-00003" for s in ("train", "validation") for i in range(3)]
    record = next(iter(tf.data.TFRecordDataset(str(built / "train-00000-of-00003"))))
    example = tf.train.Example.FromString(record.numpy())
    keys = set(example.features.feature)
    assert OFFICIAL_KEYS <= keys
    feature = example.features.feature
    assert feature["image/format"].bytes_list.value[0] == b"JPEG"
    assert feature["image/colorspace"].bytes_list.value[0] == b"RGB"
    assert feature["image/channels"].int64_list.value[0] == 3
    image = tf.io.decode_jpeg(feature["image/encoded"].bytes_list.value[0])
    assert image.shape[0] == feature["image/height"].int64_list.value[0]
    assert image.shape[1] == feature["image/width"].int64_list.value[0]


def test_round_trip_labels_and_split(tiny, built):
    rows = {r["id"]: int(r["landmark_id"]) for r in _csv_rows(tiny.train_csv)}
    mapping = {
        int(r["old_label"]): int(r["new_label"]) for r in _csv_rows(built / "relabeling.csv")
    }
    seen = {}
    for split in ("train", "validation"):
        ds = gldv2.make_dataset(
            str(built / f"{split}-*"),
            batch_size=4,
            image_size=48,
            augment=False,
            shuffle=False,
            repeat=False,
            with_ids=True,
        )
        for images, labels, ids in ds:
            assert images.dtype == tf.float32 and images.shape[1:] == (48, 48, 3)
            for label, image_id in zip(labels.numpy(), ids.numpy()):
                seen[image_id.decode()] = (split, int(label))
    assert set(seen) == set(rows)
    for image_id, (split, label) in seen.items():
        assert label == mapping[rows[image_id]]
    per_class = embedded.PRESETS["tiny"]["num_train_views"]
    expected_val = max(1, int(0.2 * per_class))
    for label in set(mapping.values()):
        n_val = sum(1 for s, lab in seen.values() if lab == label and s == "validation")
        assert n_val == expected_val
    assert gldv2.infer_num_classes(str(built / "train-*")) == len(mapping)
    assert gldv2.count_records(str(built / "validation-*")) == expected_val * len(mapping)


def test_training_stream_shapes_ranges_determinism(built):
    def first_batch(seed):
        ds = gldv2.make_dataset(str(built / "train-*"), batch_size=5, image_size=64, seed=seed)
        return next(iter(ds))

    images, labels = first_batch(0)
    assert images.shape == (5, 64, 64, 3) and labels.shape == (5,)
    assert labels.dtype == tf.int64
    assert float(tf.reduce_min(images)) >= 0.0
    assert float(tf.reduce_max(images)) <= 255.0
    assert float(tf.reduce_max(images)) > 100.0
    again, labels_again = first_batch(0)
    np.testing.assert_array_equal(images.numpy(), again.numpy())
    np.testing.assert_array_equal(labels.numpy(), labels_again.numpy())


def test_reader_errors(tmp_path):
    with pytest.raises(DataError, match="is empty"):
        gldv2.make_dataset("", batch_size=2)
    with pytest.raises(DataError, match="matches no file.*build_tfrecords"):
        gldv2.make_dataset(str(tmp_path / "train-*"), batch_size=2, flag_name="train_file_pattern")
    (tmp_path / "train-00000-of-00001").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        gldv2.make_dataset(str(tmp_path / "train-*"), batch_size=2)
    (tmp_path / "train-00000-of-00001").write_bytes(b"garbage" * 20)
    with pytest.raises(DataError, match="not a readable TFRecord"):
        gldv2.make_dataset(str(tmp_path / "train-*"), batch_size=2)
    with pytest.raises(DataError, match="--num_classes"):
        gldv2.infer_num_classes(str(tmp_path / "train-*"), scan=False)


def test_official_split_algorithm():
    labels = [5] * 10 + [9] * 3 + [7]
    val, train = btf.split_train_validation(labels, 0.2, seed=0)
    assert sorted(val + train) == list(range(len(labels)))
    assert sum(labels[i] == 5 for i in val) == 2
    assert sum(labels[i] == 9 for i in val) == 1
    assert [labels[i] for i in val].count(7) == 1  # max(1, ...) as official
    assert btf.split_train_validation(labels, 0.2, 0) == (val, train)
    assert btf.relabeling_rules([30, 10, 20, 10]) == {10: 0, 20: 1, 30: 2}


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "url", "landmark_id"])
        writer.writerows(rows)


def test_builder_inputs_and_errors(tmp_path):
    images = tmp_path / "images"
    corpus = write_bad_image_corpus(tmp_path / "corpus")
    rgb = np.full((40, 50, 3), 120, np.uint8)
    (images / "a" / "b" / "c").mkdir(parents=True)
    Image.fromarray(rgb).save(images / "a" / "b" / "c" / "abc123.jpg")
    Image.fromarray(rgb).save(images / "plain1.jpg")
    shutil.copy(tmp_path / "corpus" / "cmyk.jpg", images / "cmyk1.jpg")
    shutil.copy(tmp_path / "corpus" / "truncated.jpg", images / "broken1.jpg")
    assert "truncated.jpg" in corpus
    csv_path = tmp_path / "train.csv"
    _write_csv(
        csv_path,
        [
            ["abc123", "", 1000],
            ["plain1", "", 7],
            ["cmyk1", "", 1000],
            ["broken1", "", 7],
            ["gone1", "", 7],
        ],
    )
    base = dict(
        train_csv_path=str(csv_path),
        train_directory=str(images),
        output_directory=str(tmp_path / "out"),
        num_shards=2,
    )
    with pytest.raises(DataError, match="max_skipped_fraction"):
        btf.build_tfrecords(btf.BuildConfig(**base))
    assert (tmp_path / "out" / "missing_images.txt").read_text() == "gone1\n"
    assert "broken1" in (tmp_path / "out" / "bad_images.txt").read_text()
    out = btf.build_tfrecords(
        btf.BuildConfig(**base, max_skipped_fraction=0.5, validation_split_proportion=0.0)
    )
    assert not list(out.glob("validation-*"))
    ds = gldv2.make_dataset(
        str(out / "train-*"),
        batch_size=8,
        image_size=32,
        augment=False,
        shuffle=False,
        repeat=False,
        with_ids=True,
    )
    _, labels, ids = next(iter(ds))
    got = dict(zip([i.decode() for i in ids.numpy()], labels.numpy().tolist()))
    assert got == {"abc123": 1, "plain1": 0, "cmyk1": 1}
    with pytest.raises(DataError, match="--train_csv_path"):
        btf.build_tfrecords(
            btf.BuildConfig(**dict(base, train_csv_path=str(tmp_path / "nope.csv")))
        )
    with pytest.raises(DataError, match="--train_directory"):
        btf.build_tfrecords(btf.BuildConfig(**dict(base, train_directory=str(tmp_path / "nope"))))
    bad_header = tmp_path / "bad.csv"
    bad_header.write_text("name,label\nx,1\n")
    with pytest.raises(DataError, match="id,url,landmark_id"):
        btf.build_tfrecords(btf.BuildConfig(**dict(base, train_csv_path=str(bad_header))))


def test_clean_csv_and_cli(tiny, tmp_path, capsys):
    rows = _csv_rows(tiny.train_csv)
    clean = tmp_path / "train_clean.csv"
    with open(clean, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["landmark_id", "images"])
        writer.writerow([rows[0]["landmark_id"], " ".join(r["id"] for r in rows[:3])])
    code = btf.main(
        [
            "prog",
            f"--train_clean_csv_path={clean}",
            f"--train_directory={tiny.train_images_dir}",
            f"--output_directory={tmp_path / 'out'}",
            "--num_shards=1",
            "--validation_split_size=0.5",
        ]
    )
    assert code == 0
    assert gldv2.count_records(str(tmp_path / "out" / "*-of-*")) == 3
    assert btf.main(["prog", "--bogus_flag=1"]) == 2
    assert (
        btf.main(
            [
                "prog",
                f"--train_csv_path={tmp_path / 'x.csv'}",
                f"--train_directory={tmp_path}",
                f"--output_directory={tmp_path / 'o'}",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "bogus_flag" in err and "x.csv" in err
    assert all(len(line) < 400 for line in err.splitlines())


def test_embedded_tfrecords_built_once(tiny, tmp_path):
    out = btf.embedded_tfrecords(tiny, num_shards=2)
    assert out == tiny.root / "tfrecords"
    summary = btf.read_build_summary(out)
    assert summary["num_classes"] == embedded.PRESETS["tiny"]["num_landmarks"]
    assert gldv2.count_records(str(out / summary["train_files"])) == summary["num_train"]
    stamp = (out / "build_summary.json").stat().st_mtime_ns
    assert btf.embedded_tfrecords(tiny, num_shards=2) == out
    assert (out / "build_summary.json").stat().st_mtime_ns == stamp
    assert not list(tiny.root.glob("tfrecords.tmp-*"))
    btf.embedded_tfrecords(tiny, num_shards=1)
    assert len(list(out.glob("train-*"))) == 1
