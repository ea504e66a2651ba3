"""Faults of the end-to-end pipeline (issue #5), as a user meets them on the command line.

Already covered elsewhere (not repeated here):
* kill -9 of `python -m delg_tf.train` + resume: tests/test_training_cli.py;
* crash of the store writer mid-part + resume: tests/test_extraction_store.py;
* bad-image corpus through `delg_tf.extract.main` in-process: tests/test_extraction_batch.py;
* missing/bad flagfile of `delg_tf.train`: tests/test_training_cli.py.

Here: kill -9 of the `python -m delg_tf.extract` process and a rerun giving the store
of an uninterrupted run; disk full (ENOSPC injected into the HDF5 writer) and an
unwritable output folder; a missing SavedModel; configs naming missing files; the
bad-input folder through the extract CLI and then `python -m delg_tf.evaluate`
(some images bad: exit 0); a folder of only bad images and a model that fails on an
image (a TensorFlow graph error is not a bad image): exit `EXIT_RUN_ERROR`.
Each fault must give one clear error line (no traceback) and leave no output that a
later run would trust.
"""

import dataclasses
import errno
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
import types

import h5py
import numpy as np
import pytest
from PIL import Image

from delg_tf import demo, extract
from delg_tf.data.testing import write_bad_image_corpus
from delg_tf.extraction.extractor import DelgExtractor
from delg_tf.extraction.store import FeatureStore
from delg_tf.extraction.testing import TinyDelgStandIn, random_image
from delg_tf.extraction.config import ExportConfig
from delg_tf.serving.delg_export import export_saved_model

CONFIG = ExportConfig(
    image_scales=(0.5, 1.0),
    global_scales_ind=(1,),
    score_threshold=0.0,
    max_feature_num=20,
    max_image_size=64,
    warmup=False,
)
NUM_KILL_IMAGES = 240
KILL_FLUSH_EVERY = 2
IMAGE_SIDE = 64
SUBPROCESS_TIMEOUT_S = 300
POLL_S = 0.02
EXIT_USAGE = 2
EXIT_RUN = 3
TALL_SIDE = 80  # images this tall make FAILING_MODEL_CLI's model raise

# `python -m delg_tf.extract` whose model raises a TensorFlow graph error
# (InvalidArgumentError from an Assert op run inside a tf.function) on images at
# least TALL_SIDE pixels high, and extracts the others with the real export.
FAILING_MODEL_CLI = textwrap.dedent("""
    import sys
    import tensorflow as tf
    from delg_tf import extract

    real_make_extractor = extract.make_extractor
    tall = int(sys.argv[1])

    class FailsOnTallImages:
        def __init__(self, extractor):
            self.extractor = extractor

        @tf.function
        def check(self, image):
            tf.debugging.assert_less(tf.shape(image)[0], tall,
                                     message="conv4 input too tall for this graph")

        def __call__(self, image):
            self.check(tf.constant(image))
            return self.extractor(image)

    extract.make_extractor = lambda config: FailsOnTallImages(real_make_extractor(config))
    sys.argv = ["delg_tf.extract"] + sys.argv[2:]
    extract.cli()
""")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return export_saved_model(TinyDelgStandIn(), tmp_path_factory.mktemp("fx") / "export", CONFIG)


def _run_cli(module, *args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        **kwargs,
    )


def _assert_one_clear_error(result, *needles):
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


def _write_images(directory, count, seed=0):
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(random_image(IMAGE_SIDE, IMAGE_SIDE, seed=seed + i)).save(
            directory / f"img_{i:04d}.jpg"
        )
    return directory


def _assert_same_store(path_a, path_b):
    a, b = FeatureStore(path_a).arrays(), FeatureStore(path_b).arrays()
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_kill_9_during_extract_cli_then_rerun_gives_identical_store(tmp_path, export_dir):
    images = _write_images(tmp_path / "images", NUM_KILL_IMAGES)
    common = [
        f"--images={images}",
        f"--model_path={export_dir}",
        f"--flush_every={KILL_FLUSH_EVERY}",
        "--noprogress",
    ]
    clean = _run_cli("delg_tf.extract", *common, f"--output_dir={tmp_path / 'clean'}")
    assert clean.returncode == 0, clean.stderr[-2000:]

    out = tmp_path / "killed"
    parts = out / "features.parts"
    process = subprocess.Popen(
        [sys.executable, "-m", "delg_tf.extract", *common, f"--output_dir={out}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + SUBPROCESS_TIMEOUT_S
    while time.time() < deadline and process.poll() is None:
        if parts.is_dir() and len(list(parts.glob("part-*.h5"))) >= 2:
            break
        time.sleep(POLL_S)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "extraction finished before it could be killed"
    assert not (out / "features.h5").exists()  # nothing that looks complete
    done = len(FeatureStore(parts).names)
    assert 0 < done < NUM_KILL_IMAGES

    resumed = _run_cli("delg_tf.extract", *common, f"--output_dir={out}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{done} already done" in resumed.stdout
    _assert_same_store(tmp_path / "clean" / "features.h5", out / "features.h5")


def test_disk_full_leaves_no_trusted_output_and_rerun_completes(tmp_path, monkeypatch, export_dir):
    images = _write_images(tmp_path / "images", 9)
    extractor = DelgExtractor.from_saved_model(str(export_dir))
    config = extract.ExtractConfig(
        output_dir=str(tmp_path / "out"),
        images=str(images),
        model_path=str(export_dir),
        flush_every=2,
        progress=False,
    )
    reference = extract.main(
        dataclasses.replace(config, output_dir=str(tmp_path / "ref")), extractor=extractor
    )

    original = h5py.Group.create_dataset
    calls = {"n": 0}

    def full_disk(self, *args, **kwargs):  # the 2nd part file hits ENOSPC mid-write
        calls["n"] += 1
        if calls["n"] > 10:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", full_disk)
    with pytest.raises(OSError) as info:
        extract.main(config, extractor=extractor)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.setattr(h5py.Group, "create_dataset", original)
    out = tmp_path / "out"
    assert not (out / "features.h5").exists()
    # Only complete parts are visible to readers and to the resuming writer.
    partial = FeatureStore(out / "features.parts")
    assert 0 < len(partial.names) < 9
    store = extract.main(config, extractor=extractor)
    assert not list((out / "features.parts").glob("*.tmp"))
    _assert_same_store(reference, store)


def test_unwritable_output_dir_gives_one_clear_error(tmp_path, export_dir):
    """As root chmod does not stop writes, so the output folder's parent is a file."""
    images = _write_images(tmp_path / "images", 2)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where a folder is expected")
    result = _run_cli(
        "delg_tf.extract",
        f"--images={images}",
        f"--model_path={export_dir}",
        f"--output_dir={blocker / 'out'}",
        "--noprogress",
    )
    _assert_one_clear_error(result, str(blocker / "out"))


@pytest.mark.parametrize("layout", ["output_dir_is_a_file", "output_dir_deep_under_a_file"])
def test_output_dir_blocked_by_a_file_gives_one_clear_error(tmp_path, export_dir, layout):
    """Replaces a chmod test (root ignores permissions): a regular file in the way fails
    for every user (FileExistsError / NotADirectoryError)."""
    images = _write_images(tmp_path / "images", 2)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder is expected")
    output_dir = blocker if layout == "output_dir_is_a_file" else blocker / "a" / "b"
    result = _run_cli(
        "delg_tf.extract",
        f"--images={images}",
        f"--model_path={export_dir}",
        f"--output_dir={output_dir}",
        "--noprogress",
    )
    _assert_one_clear_error(result, str(output_dir), "--output_dir")
    assert result.returncode == EXIT_USAGE
    assert blocker.read_text() == "a file where a folder is expected"


def test_output_dir_disk_full_gives_one_clear_error(tmp_path, monkeypatch, export_dir):
    """ENOSPC from the store writer, through the CLI's error reporting (in-process)."""
    images = _write_images(tmp_path / "images", 2)
    out = tmp_path / "out"

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(h5py.Group, "create_dataset", full_disk)
    flag_values = _extract_flags(
        images=str(images), model_path=str(export_dir), output_dir=str(out), progress=False
    )
    with pytest.raises(extract.ExtractOutputError, match="free space") as info:
        extract._main_from_flags(flag_values)
    assert str(out) in str(info.value)
    assert not (out / "features.h5").exists()


def _extract_flags(**values):
    """Stand-in for the parsed absl flags of `delg_tf.extract` (attribute access only)."""
    defaults = {
        "images": None,
        "image_root": None,
        "output_dir": None,
        "delf_config": None,
        "model_path": None,
        "shard_index": 0,
        "num_shards": 1,
        "float16": False,
        "binarize": False,
        "write_delf": False,
        "flush_every": 64,
        "progress": True,
    }
    return types.SimpleNamespace(**{**defaults, **values})


def test_missing_saved_model_gives_one_clear_error_and_no_store(tmp_path):
    images = _write_images(tmp_path / "images", 2)
    missing = tmp_path / "no_export"
    result = _run_cli(
        "delg_tf.extract",
        f"--images={images}",
        f"--model_path={missing}",
        f"--output_dir={tmp_path / 'out'}",
        "--noprogress",
    )
    _assert_one_clear_error(result, str(missing), "delg_tf.export")
    assert not (tmp_path / "out" / "features.h5").exists()
    assert not list((tmp_path / "out").rglob("part-*.h5"))
    assert not (tmp_path / "out").exists()  # no empty features.parts/ left behind


def test_export_of_a_missing_logdir_gives_one_clear_error(tmp_path):
    result = _run_cli(
        "delg_tf.export",
        f"--checkpoint_dir={tmp_path / 'no_run'}",
        f"--export_path={tmp_path / 'export'}",
    )
    _assert_one_clear_error(result, "config.json")
    assert not (tmp_path / "export").exists()


def test_extract_config_naming_a_missing_delf_config_file(tmp_path):
    images = _write_images(tmp_path / "images", 1)
    missing = tmp_path / "missing_config.pbtxt"
    result = _run_cli(
        "delg_tf.extract",
        f"--images={images}",
        f"--delf_config={missing}",
        f"--output_dir={tmp_path / 'out'}",
        "--noprogress",
    )
    _assert_one_clear_error(result, str(missing))
    assert "does not exist" in result.stderr or "not found" in result.stderr
    assert not (tmp_path / "out" / "features.h5").exists()
    assert not (tmp_path / "out").exists()


def test_demo_unwritable_output_dir_gives_one_clear_error(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where a folder is expected")
    result = _run_cli("delg_tf.demo", f"--output_dir={blocker / 'demo_out'}", "--noprogress")
    _assert_one_clear_error(result, str(blocker / "demo_out"))


def test_demo_results_json_write_failure_leaves_no_file(tmp_path, monkeypatch):
    """ENOSPC while writing results.json: the error surfaces, no partial JSON remains."""
    from delg_tf import atomic

    def full_disk(fd):  # half the bytes reach the disk
        os.ftruncate(fd, os.fstat(fd).st_size // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic.os, "fsync", full_disk)
    target = tmp_path / demo.RESULTS_JSON
    with pytest.raises(OSError):
        demo._write_json_atomic({"global": {"mAP": 1.0}}, target)
    assert list(tmp_path.iterdir()) == []


def test_demo_with_a_missing_flagfile_fails_before_writing(tmp_path):
    out = tmp_path / "demo_out"
    result = _run_cli(
        "delg_tf.demo",
        f"--output_dir={out}",
        f"--train_flagfile={tmp_path / 'missing.flags'}",
        "--noprogress",
    )
    _assert_one_clear_error(result, "missing.flags")
    assert not out.exists()


def test_demo_config_naming_a_missing_file_fails_before_writing(tmp_path):
    """A flagfile that itself names a missing file (the training data)."""
    flagfile = tmp_path / "bad.flags"
    flagfile.write_text(
        "--model_family=delg\n--data_source=gldv2\n"
        f"--train_file_pattern={tmp_path / 'nowhere' / 'train-*'}\n"
    )
    out = tmp_path / "demo_out"
    result = _run_cli(
        "delg_tf.demo", f"--output_dir={out}", f"--train_flagfile={flagfile}", "--noprogress"
    )
    _assert_one_clear_error(result)
    assert not (out / demo.RESULTS_JSON).exists()
    assert not (out / demo.EXPORT_SUBDIR).exists()


def test_bad_input_folder_through_extract_and_evaluate(tmp_path, export_dir):
    entries = write_bad_image_corpus(tmp_path / "images")
    good = sorted(name for name, e in entries.items() if e.ok)
    bad = sorted(name for name, e in entries.items() if not e.ok)
    assert bad and good
    out = tmp_path / "features"
    result = _run_cli(
        "delg_tf.extract",
        f"--images={tmp_path / 'images'}",
        f"--model_path={export_dir}",
        f"--output_dir={out}",
        "--noprogress",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{len(good)} extracted" in result.stdout and f"{len(bad)} failed" in result.stdout
    assert sorted(FeatureStore(out / "features.h5").names) == good  # every good one
    logged = [
        line.split("\t")[0]
        for line in (out / "errors.tsv").read_text(encoding="utf-8").splitlines()[1:]
    ]
    assert sorted(logged) == bad  # every bad one listed, by name

    # Evaluate over the good images (each queries the database of all good images).
    gnd = {
        "imlist": good,
        "qimlist": good[:2],
        "gnd": [
            {"easy": np.array([i]), "hard": np.array([], np.int64), "junk": np.array([], np.int64)}
            for i in range(2)
        ],
    }
    gnd_path = tmp_path / "gnd_good.pkl"
    gnd_path.write_bytes(pickle.dumps(gnd))
    store = out / "features.h5"
    ok = _run_cli(
        "delg_tf.evaluate",
        f"--gnd_path={gnd_path}",
        f"--db_features={store}",
        f"--query_features={store}",
        f"--output_json={tmp_path / 'eval.json'}",
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (tmp_path / "eval.json").is_file()

    # A ground truth naming a bad (skipped) image: one clear error naming it.
    gnd["imlist"] = good + [bad[0]]
    bad_gnd = tmp_path / "gnd_with_bad.pkl"
    bad_gnd.write_bytes(pickle.dumps(gnd))
    failed = _run_cli(
        "delg_tf.evaluate",
        f"--gnd_path={bad_gnd}",
        f"--db_features={store}",
        f"--query_features={store}",
        f"--output_json={tmp_path / 'bad.json'}",
    )
    _assert_one_clear_error(failed, bad[0])
    assert not (tmp_path / "bad.json").exists()


def test_extract_cli_of_only_bad_images_fails_with_one_line(tmp_path, export_dir):
    entries = write_bad_image_corpus(tmp_path / "corpus")
    bad = sorted(name for name, e in entries.items() if not e.ok)
    images = tmp_path / "images"
    images.mkdir()
    for name in bad:
        (tmp_path / "corpus" / name).rename(images / name)
    out = tmp_path / "out"
    result = _run_cli(
        "delg_tf.extract",
        f"--images={images}",
        f"--model_path={export_dir}",
        f"--output_dir={out}",
        "--noprogress",
    )
    _assert_one_clear_error(
        result, f"all {len(bad)} of {len(bad)} images failed", str(out / "errors.tsv")
    )
    assert result.returncode == EXIT_RUN
    assert not (out / "features.h5").exists()
    logged = [
        line.split("\t")[0]
        for line in (out / "errors.tsv").read_text(encoding="utf-8").splitlines()[1:]
    ]
    assert sorted(logged) == bad


def test_extract_cli_stops_when_the_model_fails_and_a_rerun_resumes(tmp_path, export_dir):
    images = _write_images(tmp_path / "images", 2)  # img_0000.jpg, img_0001.jpg
    Image.fromarray(random_image(TALL_SIDE, IMAGE_SIDE, seed=7)).save(images / "img_0002.jpg")
    Image.fromarray(random_image(IMAGE_SIDE, IMAGE_SIDE, seed=8)).save(images / "img_0003.jpg")
    out = tmp_path / "out"
    script = tmp_path / "failing_model_extract.py"
    script.write_text(FAILING_MODEL_CLI)
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            str(TALL_SIDE),
            f"--images={images}",
            f"--model_path={export_dir}",
            f"--output_dir={out}",
            "--flush_every=1",
            "--noprogress",
        ],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    _assert_one_clear_error(
        result,
        "'img_0002.jpg'",
        f"--model_path={export_dir}",
        "InvalidArgumentError",
        "not a bad image",
    )
    assert result.returncode == EXIT_RUN
    assert "conv4 input too tall" in result.stderr  # the first line of the TF error
    assert (
        "[[" not in [line for line in result.stderr.splitlines() if line.startswith("error:")][0]
    )  # no graph node trace
    # Not a bad image: no row in the error log, no store; the images before are kept.
    assert (out / "errors.tsv").read_text(encoding="utf-8") == extract.ERROR_LOG_HEADER
    assert not (out / "features.h5").exists()
    assert sorted(FeatureStore(out / "features.parts").names) == ["img_0000.jpg", "img_0001.jpg"]
    # Once the model works, a rerun resumes from the kept images.
    config = extract.ExtractConfig(
        output_dir=str(out), images=str(images), model_path=str(export_dir), progress=False
    )
    store = extract.main(config, extractor=DelgExtractor.from_saved_model(str(export_dir)))
    assert len(FeatureStore(store)) == 4
