"""Corrupted files (issue 16, "Corruption is detected"): one clear error, never a wrong result.

* feature stores: bytes flipped in the middle of a store's descriptors (global rows:
  `python -m delg_tf.evaluate --db_features=...`; local rows: `FeatureStore.local`) and
  a truncated store give one error naming the file, the images and the fix; a store
  written before checksums still reads, with a warning; a resumed extraction moves a
  corrupted part aside and extracts its images again (same store as a clean run);
* `.delf` / `.delg_global` files with flipped bytes or truncated: one error naming the file;
  files without a checksum (official tools) still read;
* checkpoints: bytes flipped in the newest checkpoint: training resumes from the previous
  one, `load_run` restores the previous one, both with a warning naming both; none
  restorable: one error naming the logdir.
"""

import glob
import logging
import os
import pickle
import subprocess
import sys

import h5py
import numpy as np
import pytest
from PIL import Image

from delg_tf import extract
from delg_tf.extraction import delf_io
from delg_tf.extraction.store import (
    CHECKSUMS_ATTR,
    STRING_DTYPE,
    FeatureStore,
    FeatureStoreWriter,
    StoreCorruptedError,
    consolidate,
)
from delg_tf.protos import feature_pb2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_IMAGES = 40
GLOBAL_DIM = 2048  # 8 KiB rows: a 128 KiB chunk holds 16 images
LOCAL_DIM = 128
MAX_FEATURES = 300
FLUSH_EVERY = 8
SUBPROCESS_TIMEOUT_S = 300
FLIPPED_BYTES = 16


def _features(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, MAX_FEATURES))
    return {
        "image_shape": (64, 48, 3),
        "global_descriptor": rng.normal(size=GLOBAL_DIM).astype(np.float32),
        "locations": rng.uniform(0, 48, (n, 2)).astype(np.float32),
        "descriptors": rng.normal(size=(n, LOCAL_DIM)).astype(np.float32),
        "attention": rng.uniform(0, 2, n).astype(np.float32),
        "scales": rng.choice([0.5, 1.0, 2.0], n).astype(np.float32),
    }


def _names(count=NUM_IMAGES):
    return [f"img_{k:03d}" for k in range(count)]


@pytest.fixture()
def store(tmp_path):
    with FeatureStoreWriter(tmp_path / "parts", flush_every=FLUSH_EVERY) as writer:
        for k, name in enumerate(_names()):
            writer.add(name, _features(k))
    return consolidate(tmp_path / "parts", tmp_path / "features.h5")


def _flip_middle_chunk(path, key):
    """Flips bytes in the middle of the middle chunk of dataset `key`; returns the
    chunk's row range."""
    with h5py.File(path, "r") as f:
        dataset = f[key]
        assert dataset.fletcher32 and dataset.chunks
        info = dataset.id.get_chunk_info(dataset.id.get_num_chunks() // 2)
        first = info.chunk_offset[0]
        rows = (first, min(first + dataset.chunks[0], dataset.shape[0]))
    with open(path, "r+b") as f:
        f.seek(info.byte_offset + info.size // 2)
        data = bytearray(f.read(FLIPPED_BYTES))
        f.seek(info.byte_offset + info.size // 2)
        f.write(bytes(b ^ 0xFF for b in data))
    return rows


def _run_cli(module, *args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        env=env,
    )


def _one_error_line(result):
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def _evaluate(tmp_path, store_path, output):
    names = _names()
    gnd = {
        "imlist": names,
        "qimlist": names[:3],
        "gnd": [
            {"easy": np.array([i]), "hard": np.array([], np.int64), "junk": np.array([], np.int64)}
            for i in range(3)
        ],
    }
    gnd_path = tmp_path / "gnd.pkl"
    gnd_path.write_bytes(pickle.dumps(gnd))
    return _run_cli(
        "delg_tf.evaluate",
        f"--gnd_path={gnd_path}",
        f"--db_features={store_path}",
        f"--query_features={store_path}",
        f"--output_json={output}",
    )


def test_flipped_global_descriptors_fail_evaluate_naming_file_and_images(tmp_path, store):
    first, last = _flip_middle_chunk(store, "global_descriptors")
    error = _one_error_line(_evaluate(tmp_path, store, tmp_path / "eval.json"))
    assert not (tmp_path / "eval.json").exists()  # no mAP from corrupted rows
    assert str(store) in error and "corrupted" in error and "checksum" in error
    expected = _names()[first:last]
    assert f"the features of {len(expected)} image(s) cannot be trusted" in error
    assert repr(expected[0]) in error
    assert "delete it and rerun the extraction command" in error


def test_flipped_local_descriptors_name_the_images_of_the_bad_rows(tmp_path, store):
    first, last = _flip_middle_chunk(store, "descriptors")
    opened = FeatureStore(store)  # names and offsets are fine: it opens
    counts = [len(_features(k)["scales"]) for k in range(NUM_IMAGES)]
    offsets = np.concatenate([[0], np.cumsum(counts)])
    hit = [k for k in range(NUM_IMAGES) if offsets[k] < last and offsets[k + 1] > first]
    for k in range(NUM_IMAGES):
        if k in hit:
            with pytest.raises(StoreCorruptedError) as info:
                opened.local(k)
            assert info.value.names == [_names()[k] for k in hit]
            assert str(store) in str(info.value) and "'descriptors' rows" in str(info.value)
        else:  # the other images read as written
            np.testing.assert_array_equal(opened.local(k)[1], _features(k)["descriptors"])
    with pytest.raises(StoreCorruptedError, match="cannot be trusted"):
        opened.arrays()


def test_truncated_store_gives_one_error_naming_the_file(tmp_path, store):
    data = store.read_bytes()
    store.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreCorruptedError, match="truncated"):
        FeatureStore(store)
    error = _one_error_line(_evaluate(tmp_path, store, tmp_path / "eval.json"))
    assert str(store) in error and "truncated" in error
    assert "every image of this file is affected" in error and "re-extract" in error


def test_store_written_without_checksums_reads_with_a_warning(tmp_path, store, caplog):
    arrays = FeatureStore(store).arrays()
    old = tmp_path / "old.h5"  # the layout as delg_tf wrote it before checksums
    with h5py.File(old, "w") as f:
        for key, value in arrays.items():
            if key == "names":
                f.create_dataset(key, data=value.astype(object), dtype=STRING_DTYPE)
            else:
                f.create_dataset(key, data=value)
        f.attrs.update(
            {
                "format_version": 1,
                "float16": False,
                "binarized": False,
                "local_dim": LOCAL_DIM,
                "global_dim": GLOBAL_DIM,
            }
        )
    with caplog.at_level(logging.WARNING):
        opened = FeatureStore(old)
    assert "without checksums" in caplog.text and "no verification possible" in caplog.text
    np.testing.assert_array_equal(opened.global_descriptors, arrays["global_descriptors"])
    with h5py.File(store, "r") as f:
        assert f.attrs[CHECKSUMS_ATTR] == "fletcher32"


def _image_items(folder, count):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(count):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(folder / f"{k}.png")
    return sorted(folder.iterdir())


def _fake_extractor(image):
    return _features(int(np.asarray(image).sum()))


def test_resume_moves_a_corrupted_part_aside_and_extracts_its_images_again(tmp_path, caplog):
    paths = _image_items(tmp_path / "images", 6)
    config = extract.ExtractConfig(
        output_dir=str(tmp_path / "out"), model_path="unused", flush_every=2, progress=False
    )
    clean = extract.main(
        extract.ExtractConfig(
            output_dir=str(tmp_path / "clean"), model_path="unused", progress=False
        ),
        paths=paths,
        extractor=_fake_extractor,
    )
    extract.main(config, paths=paths, extractor=_fake_extractor)
    part = config.parts_dir / "part-000001.h5"
    with h5py.File(part, "r") as f:
        bad_names = sorted(n.decode() for n in f["names"][()])
    _flip_middle_chunk(part, "descriptors")
    with caplog.at_level(logging.WARNING):
        store = extract.main(config, paths=paths, extractor=_fake_extractor)
    assert f"part {part} is corrupted" in caplog.text
    assert f"moved it to {part}.corrupt" in caplog.text
    assert all(repr(name) in caplog.text for name in bad_names)
    assert (config.parts_dir / "part-000001.h5.corrupt").is_file()
    a, b = FeatureStore(clean).arrays(), FeatureStore(store).arrays()
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_flipped_or_truncated_delf_and_global_files_give_one_error(tmp_path):
    features = _features(1)
    delf, datum = tmp_path / "a.jpg.delf", tmp_path / "a.jpg.delg_global"
    delf_io.write_delf(
        delf,
        features["locations"],
        features["scales"],
        features["descriptors"],
        features["attention"],
    )
    delf_io.write_datum(datum, features["global_descriptor"])
    np.testing.assert_array_equal(delf_io.read_delf(delf)[2], features["descriptors"])
    # Official readers skip the checksum field (an unknown field).
    official = feature_pb2.DelfFeatures.FromString(delf.read_bytes())
    assert len(official.feature) == len(features["scales"])
    for path, reader in ((delf, delf_io.read_delf), (datum, delf_io.read_datum)):
        data = path.read_bytes()
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0x01  # a float's low bit: parses fine, but wrong
        path.write_bytes(bytes(flipped))
        with pytest.raises(delf_io.FeatureFileCorruptedError) as info:
            reader(path)
        assert str(path) in str(info.value) and "checksum does not match" in str(info.value)
        assert "re-extract that image" in str(info.value)
        path.write_bytes(data[: len(data) - 7])
        with pytest.raises(delf_io.FeatureFileCorruptedError, match="truncated"):
            reader(path)
    # A file without the checksum (official feature_io.WriteToFile) reads as it is.
    delf.write_bytes(official.SerializeToString())
    np.testing.assert_array_equal(delf_io.read_delf(delf)[2], features["descriptors"])


# --------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------


def _flip_checkpoint(prefix):
    (data,) = glob.glob(f"{prefix}.data-*")
    raw = bytearray(open(data, "rb").read())
    for k in range(FLIPPED_BYTES):
        raw[len(raw) // 2 + k] ^= 0xFF
    open(data, "wb").write(bytes(raw))


def _train_config(logdir, max_iters):
    from training_helpers import embedded_tiny_data_dir

    from delg_tf.training.config import TrainConfig

    return TrainConfig(
        logdir=str(logdir),
        data_source="embedded",
        data_dir=embedded_tiny_data_dir(),
        embedded_preset="tiny",
        max_iters=max_iters,
        batch_size=4,
        image_size=64,
        checkpoint_interval=2,
        log_interval=2,
        summary_interval=2,
        validation_interval=0,
        max_checkpoints_to_keep=3,
    )


def _model_config():
    from delg_tf.models.delg import DelgModelConfig

    return DelgModelConfig(
        num_classes=1, backbone="tiny", embedding_dim=16, local_dim=8, attention_hidden=8
    )


def test_flipped_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    import tensorflow as tf

    from delg_tf.training import runs
    from delg_tf.training.trainer import TrainingError, train

    logdir = tmp_path / "run"
    train(_train_config(logdir, 4), _model_config())
    newest, previous = f"{logdir}/ckpt-4", f"{logdir}/ckpt-2"
    _flip_checkpoint(newest)
    assert runs.checkpoint_damage(newest) is not None

    with caplog.at_level(logging.WARNING):
        model = runs.load_run(logdir)
    warning = f"checkpoint {newest} cannot be restored"
    assert warning in caplog.text
    assert f"falling back to the previous checkpoint {previous}" in caplog.text
    reference = runs.load_run(logdir, previous)  # the model of ckpt-2, bit for bit
    for a, b in zip(model.weights, reference.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    with pytest.raises(runs.CheckpointDamagedError, match="ckpt-4 cannot be restored"):
        runs.load_run(logdir, newest)

    caplog.clear()
    with caplog.at_level(logging.INFO):
        train(_train_config(logdir, 6), _model_config())
    assert warning in caplog.text and f"previous checkpoint {previous}" in caplog.text
    assert f"resumed from checkpoint {previous} at step 2" in caplog.text
    assert runs.checkpoint_step(tf.train.latest_checkpoint(str(logdir))) == 6

    for prefix in runs._listed_checkpoints(logdir):  # pylint: disable=protected-access
        _flip_checkpoint(prefix)
    with pytest.raises(TrainingError) as info:
        train(_train_config(logdir, 8), _model_config())
    assert f"--logdir={logdir}: none of its" in str(info.value)
    assert "fix:" in str(info.value)
    with pytest.raises(runs.CheckpointDamagedError, match=f"--logdir={logdir}: none of its"):
        runs.load_run(logdir)
