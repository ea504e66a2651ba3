"""One writer per output (issue 16): `delg_tf.locking` and the commands that use it.

* the module: a second process refuses with the holder named (pid, host, start time,
  command); a killed holder's lock is taken over; of processes starting together
  exactly one gets the lock (flock, no check-then-create race);
* two `python -m delg_tf.train` on one --logdir: the second refuses in one line, the
  first finishes with intact checkpoints;
* two `python -m delg_tf.extract` on one --output_dir: the same shard is refused, the
  first's store is complete; two shards of one folder both run;
* export, evaluate's cache and the Beam output refuse while another process holds
  their lock (in process, the holder a subprocess).

A long run is simulated by SIGSTOP: the first process is stopped once it writes (it
keeps its lock: a stopped process is alive), the second runs, then SIGCONT lets the
first finish; so the second always meets a held lock, whatever the machine's speed.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import types

import pytest
from PIL import Image

from delg_tf import locking

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 180
POLL_S = 0.01
EXIT_USAGE = 2
HOLDER_MARKER = "lock-holder-under-test"
# Holds `output_lock(argv[1], ..., name=argv[2] or None)`, prints "held", then waits to
# be killed.
HOLDER_SCRIPT = textwrap.dedent(f"""
    import sys, time
    from delg_tf.locking import output_lock
    with output_lock(sys.argv[1], "{HOLDER_MARKER}", name=sys.argv[2] or None):
        print("held", flush=True)
        time.sleep(600)
""")
# Waits for the file argv[2] to appear, then tries the lock of folder argv[1] once:
# prints "got" (and holds it for a while) or "refused".
RACER_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from delg_tf.locking import LockedError, output_lock
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.001)
    try:
        with output_lock(sys.argv[1], "race"):
            print("got", flush=True)
            time.sleep(2)
    except LockedError:
        print("refused", flush=True)
""")
NUM_RACERS = 4
NUM_IMAGES = 30
IMAGE_SIDE = 64
TRAIN_STEPS = 200


def _env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    return env


def _start_holder(path, name=locking.LOCK_NAME):
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER_SCRIPT, str(path), name or ""],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "held"
    return process


def _stop(process):
    if process.poll() is None:
        process.kill()
    process.wait()


def _wait_for(condition, process, what):
    deadline = time.time() + TIMEOUT_S
    while not condition():
        assert process.poll() is None, f"exited with {process.returncode} before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(POLL_S)


def _one_error_line(result):
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def _assert_names_holder(message, pid, what):
    assert what in message
    assert f"pid {pid} on host {socket.gethostname()}" in message, message
    assert re.search(r"started \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", message), message
    assert "command: " in message and "wait for that run to end" in message
    assert f"kill {pid}" in message and "use another folder" in message


# --------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------


def test_second_process_refuses_naming_the_holder(tmp_path):
    holder = _start_holder(tmp_path / "out")
    try:
        with pytest.raises(locking.LockedError) as info:
            with locking.output_lock(tmp_path / "out", "--output_dir=out"):
                pytest.fail("got a lock another process holds")
        message = str(info.value)
        assert "\n" not in message
        _assert_names_holder(message, holder.pid, "--output_dir=out")
        assert HOLDER_MARKER in message  # its command line
        assert info.value.holder["pid"] == holder.pid
        assert info.value.path == tmp_path / "out" / locking.LOCK_NAME
        assert isinstance(info.value, locking.ConfigError)  # a one-line error of every CLI
        # Another lock file of the same folder is another output (extraction shards).
        with locking.output_lock(tmp_path / "out", "shard 1", name=".other.lock"):
            pass
    finally:
        _stop(holder)


def test_lock_of_a_killed_holder_is_taken_over(tmp_path):
    lock_file = tmp_path / "export.lock"
    holder = _start_holder(lock_file, name=None)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert locking.read_holder(lock_file)["pid"] == holder.pid  # left behind, stale
    with locking.output_lock(lock_file, "--export_path=x", name=None) as lock:
        assert lock.previous["pid"] == holder.pid
        assert locking.read_holder(lock_file) == lock.holder
        assert lock.holder["pid"] == os.getpid()
    assert not lock_file.exists()  # removed on release


def test_object_store_paths_are_written_without_a_lock(caplog):
    with locking.output_lock("gs://bucket/run", "--logdir=gs://bucket/run") as lock:
        assert lock.path is None
    assert "no file locks" in caplog.text


def test_of_processes_starting_together_exactly_one_gets_the_lock(tmp_path):
    go = tmp_path / "go"
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER_SCRIPT, str(tmp_path / "out"), str(go)],
            cwd=REPO,
            env=_env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(NUM_RACERS)
    ]
    time.sleep(0.5)  # every racer is polling for the start signal
    go.write_text("go")
    outputs = [racer.communicate(timeout=TIMEOUT_S)[0].strip() for racer in racers]
    assert sorted(outputs) == ["got"] + ["refused"] * (NUM_RACERS - 1)


# --------------------------------------------------------------------------
# python -m delg_tf.train
# --------------------------------------------------------------------------


def _checkpoint_state(logdir):
    state = logdir / "checkpoint"
    return state.read_text() if state.is_file() else ""


def test_two_trainings_on_one_logdir_the_second_refuses(tmp_path):
    import tensorflow as tf
    from training_helpers import embedded_tiny_data_dir

    logdir = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "delg_tf.train",
        "--flagfile=configs/demo.flags",
        f"--logdir={logdir}",
        f"--data_dir={embedded_tiny_data_dir()}",
        "--embedded_preset=tiny",
        "--embedded_train_landmarks=0",
        "--image_size=64",
        "--batch_size=4",
        f"--max_iters={TRAIN_STEPS}",
        "--log_interval=1",
        "--checkpoint_interval=50",
        "--validation_interval=0",
    ]
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        first = subprocess.Popen(args, cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: f"step 1/{TRAIN_STEPS}" in log.read_text(), first, "step 1")
        first.send_signal(signal.SIGSTOP)  # mid-run, holding the lock
        second = subprocess.run(
            args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S
        )
        first.send_signal(signal.SIGCONT)
        assert second.returncode == EXIT_USAGE, second.stderr[-3000:]
        _assert_names_holder(_one_error_line(second), first.pid, f"--logdir={logdir}")
        assert first.wait(timeout=TIMEOUT_S) == 0, log.read_text()[-3000:]
    finally:
        first.send_signal(signal.SIGCONT)
        _stop(first)
    assert f"training finished at step {TRAIN_STEPS}" in log.read_text()
    latest = tf.train.latest_checkpoint(str(logdir))
    assert latest.endswith(f"ckpt-{TRAIN_STEPS}"), _checkpoint_state(logdir)
    reader = tf.train.load_checkpoint(latest)
    assert reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE") == TRAIN_STEPS
    assert json.loads((logdir / "config.json").read_text())["train"]["max_iters"] == TRAIN_STEPS
    # Only the first wrote events (TensorBoard names their files after host and pid).
    events = [p.name for p in logdir.rglob("events.out.tfevents.*")]
    assert events and all(f".{first.pid}." in name for name in events), events
    assert not (logdir / locking.LOCK_NAME).exists()  # released at the end


# --------------------------------------------------------------------------
# python -m delg_tf.extract
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    from delg_tf.extraction.config import ExportConfig
    from delg_tf.extraction.testing import TinyDelgStandIn
    from delg_tf.serving.delg_export import export_saved_model

    config = ExportConfig(
        image_scales=(0.5, 1.0),
        global_scales_ind=(1,),
        score_threshold=0.0,
        max_feature_num=20,
        max_image_size=64,
        warmup=False,
    )
    return export_saved_model(TinyDelgStandIn(), tmp_path_factory.mktemp("lk") / "export", config)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from delg_tf.extraction.testing import random_image

    folder = tmp_path_factory.mktemp("lk") / "images"
    folder.mkdir()
    for i in range(NUM_IMAGES):
        Image.fromarray(random_image(IMAGE_SIDE, IMAGE_SIDE, seed=i)).save(
            folder / f"img_{i:03d}.jpg"
        )
    return folder


def _extract_args(images, export_dir, out, *extra):
    return [
        sys.executable,
        "-m",
        "delg_tf.extract",
        f"--images={images}",
        f"--model_path={export_dir}",
        f"--output_dir={out}",
        "--flush_every=1",
        "--noprogress",
        *extra,
    ]


def _start_and_stop_once_writing(args, parts):
    """Starts an extraction and SIGSTOPs it once its first part is written."""
    process = subprocess.Popen(
        args, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for(lambda: parts.is_dir() and any(parts.glob("part-*.h5")), process, "the first part")
    process.send_signal(signal.SIGSTOP)
    return process


def _finish(process):
    process.send_signal(signal.SIGCONT)
    stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    assert process.returncode == 0, stderr[-3000:]
    return stdout


def _store_names(path):
    from delg_tf.extraction.store import FeatureStore

    with FeatureStore(path) as store:
        return sorted(store.names)


def test_two_extractions_of_one_shard_the_second_refuses(tmp_path, export_dir, images):
    out = tmp_path / "out"
    args = _extract_args(images, export_dir, out)
    first = _start_and_stop_once_writing(args, out / "features.parts")
    try:
        second = subprocess.run(
            args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S
        )
        assert second.returncode == EXIT_USAGE, second.stderr[-3000:]
        _assert_names_holder(_one_error_line(second), first.pid, f"--output_dir={out} (shard 0/1)")
        assert f"{NUM_IMAGES} extracted, 0 already done" in _finish(first)
    finally:
        first.send_signal(signal.SIGCONT)
        _stop(first)
    assert _store_names(out / "features.h5") == sorted(p.name for p in images.iterdir())
    assert (out / "errors.tsv").read_text().count("\n") == 1  # the header only
    assert sorted(p.name for p in out.iterdir()) == ["errors.tsv", "features.h5", "features.parts"]


def test_two_shards_in_one_folder_both_run(tmp_path, export_dir, images):
    out = tmp_path / "out"
    shard = ["--num_shards=2", "--shard_index={}"]
    first = _start_and_stop_once_writing(
        _extract_args(images, export_dir, out, shard[0], shard[1].format(0)),
        out / "features-00000-of-00002.parts",
    )
    try:
        second = subprocess.run(
            _extract_args(images, export_dir, out, shard[0], shard[1].format(1)),
            cwd=REPO,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        assert second.returncode == 0, second.stderr[-3000:]  # while shard 0 holds its lock
        _finish(first)
    finally:
        first.send_signal(signal.SIGCONT)
        _stop(first)
    names = sorted(p.name for p in images.iterdir())
    assert _store_names(out / "features-00000-of-00002.h5") == names[0::2]
    assert _store_names(out / "features-00001-of-00002.h5") == names[1::2]


# --------------------------------------------------------------------------
# export, evaluate's cache, the Beam output (in process, held by a subprocess)
# --------------------------------------------------------------------------


def test_export_refuses_while_another_writes_the_path(tmp_path):
    from delg_tf import export
    from delg_tf.extraction.config import ExportConfig

    target = tmp_path / "exports" / "model"
    holder = _start_holder(locking.sibling_lock_file(target), name=None)
    try:
        config = export.ExportRunConfig(
            checkpoint_dir=str(tmp_path / "run"), export_path=str(target), export=ExportConfig()
        )
        with pytest.raises(locking.LockedError) as info:
            export.main(config)
        _assert_names_holder(str(info.value), holder.pid, f"--export_path={target}")
        assert not target.exists()
    finally:
        _stop(holder)


def test_evaluation_refuses_a_cache_another_run_writes(tmp_path):
    from delg_tf.evaluation.end_to_end import DatasetEvalConfig, extract_dataset

    model = tmp_path / "model"
    model.mkdir()
    (model / "saved_model.pb").write_bytes(b"")
    cache = tmp_path / "cache"
    holder = _start_holder(cache)
    try:
        config = DatasetEvalConfig(
            output_json=str(tmp_path / "r.json"),
            cache_dir=str(cache),
            model_path=str(model),
            progress=False,
        )
        dataset = types.SimpleNamespace(imlist=["a"], distractors=[], qimlist=["q"])
        with pytest.raises(locking.LockedError) as info:
            extract_dataset(dataset, config)
        _assert_names_holder(str(info.value), holder.pid, f"--cache_dir={cache}")
        assert sorted(p.name for p in cache.iterdir()) == [locking.LOCK_NAME]  # untouched
    finally:
        _stop(holder)


def test_beam_extraction_refuses_an_output_another_run_writes(tmp_path, images):
    from delg_tf.extraction import beam as beam_lib  # .[all] installs apache-beam

    model = tmp_path / "model"
    model.mkdir()
    (model / "saved_model.pb").write_bytes(b"")
    out = tmp_path / "out"
    holder = _start_holder(out)
    try:
        config = beam_lib.BeamExtractConfig(
            output_dir=str(out), images=str(images), model_path=str(model)
        )
        with pytest.raises(locking.LockedError) as info:
            beam_lib.run(config)
        _assert_names_holder(str(info.value), holder.pid, f"--output_dir={out}")
        assert sorted(p.name for p in out.iterdir()) == [locking.LOCK_NAME]  # untouched
    finally:
        _stop(holder)
