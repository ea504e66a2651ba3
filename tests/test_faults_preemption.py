"""Preemption (issue 16): SIGTERM / SIGINT stop training and extraction at a safe point.

* `python -m delg_tf.train --flagfile=configs/demo.flags`: SIGTERM after the log line of
  step k checkpoints the step reached (exit 143, one line saying how to resume); the same
  command resumes from it and ends with the weights of an uninterrupted run, bit for bit
  (--deterministic, data iterator position in the checkpoint);
* a two-worker run (loopback TF_CONFIG): SIGTERM to one worker makes both save the same
  step through TensorFlow's PreemptionCheckpointHandler and exit 143; restarting both
  resumes from the chief's checkpoint of that step;
* `python -m delg_tf.extract`: SIGTERM mid-way flushes the queued images to a complete
  part (exit 143, "resumable"), and a rerun gives the store of an uninterrupted run;
* `delg_tf.interrupts.stop_requests` records SIGINT too (exit 130) and a second SIGINT
  raises KeyboardInterrupt.
"""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from delg_tf import interrupts
from delg_tf.extraction.config import ExportConfig
from delg_tf.extraction.store import FeatureStore
from delg_tf.extraction.testing import TinyDelgStandIn, random_image
from delg_tf.serving.delg_export import export_saved_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300
POLL_S = 0.05
MAX_ITERS = 30
STOP_AFTER_STEP = 10
TRAIN_FLAGS = (
    "--flagfile=configs/demo.flags",
    f"--max_iters={MAX_ITERS}",
    "--checkpoint_interval=1000",
    "--log_interval=1",
    "--summary_interval=1000",
    "--validation_interval=0",
)
STOPPED = re.compile(r"training stopped by SIGTERM at step (\d+)/(\d+): checkpoint (\S+) saved")
DIGEST = re.compile(r"model weights at step (\d+): sha256 (\w+)")
# Not model state (the object graph; the iterator's serialized state holds file paths).
NOT_COMPARED = ("_CHECKPOINTABLE_OBJECT_GRAPH", "data_iterator/.ATTRIBUTES/ITERATOR_STATE")
EXTRACT_CONFIG = ExportConfig(
    image_scales=(0.5, 1.0),
    global_scales_ind=(1,),
    score_threshold=0.0,
    max_feature_num=20,
    max_image_size=64,
    warmup=False,
)
NUM_IMAGES = 120
FLUSH_EVERY = 4
IMAGE_SIDE = 64


def _env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    return env


def _run(module, args):
    """`python -m module args` to the end, in the repository, output captured."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


def _start(module, args, log):
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=REPO,
            env=_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _wait_for(process, log, predicate, what):
    deadline = time.time() + TIMEOUT_S
    while not predicate():
        assert process.poll() is None, f"ended before {what}: " + open(log).read()[-3000:]
        assert time.time() < deadline, f"no {what} in time"
        time.sleep(POLL_S)


def _error_lines(text):
    assert "Traceback" not in text, text[-3000:]
    return [line for line in text.splitlines() if line.startswith("error: ")]


def _tensors(prefix):
    reader = tf.train.load_checkpoint(prefix)
    return {
        name: reader.get_tensor(name)
        for name in reader.get_variable_to_shape_map()
        if name not in NOT_COMPARED
    }


def test_sigterm_during_training_checkpoints_the_step_and_the_rerun_matches(tmp_path):
    data = f"--data_dir={tmp_path / 'data'}"
    clean = _run("delg_tf.train", [*TRAIN_FLAGS, data, f"--logdir={tmp_path / 'clean'}"])
    assert clean.returncode == 0, clean.stderr[-3000:]

    logdir, log = tmp_path / "stopped", tmp_path / "stopped.log"
    args = [*TRAIN_FLAGS, data, f"--logdir={logdir}"]
    process = _start("delg_tf.train", args, log)
    try:
        _wait_for(
            process,
            log,
            lambda: f"step {STOP_AFTER_STEP}/{MAX_ITERS}:" in open(log).read(),
            f"log line of step {STOP_AFTER_STEP}",
        )
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
    text = open(log).read()
    assert code == interrupts.EXIT_TERMINATED, text[-3000:]
    (error,) = _error_lines(text)
    match = STOPPED.search(error)
    assert match, error
    stopped_at = int(match.group(1))
    assert STOP_AFTER_STEP <= stopped_at < MAX_ITERS
    assert match.group(3) == f"{logdir}/ckpt-{stopped_at}"
    assert f"rerun the same command (same --logdir={logdir}) to resume" in error
    from delg_tf.training.runs import checkpoint_step

    assert checkpoint_step(tf.train.latest_checkpoint(str(logdir))) == stopped_at
    print(f"stopped at step {stopped_at} (SIGTERM after the line of step {STOP_AFTER_STEP})")

    resumed = _run("delg_tf.train", args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from checkpoint {logdir}/ckpt-{stopped_at} at step {stopped_at}" in (
        resumed.stderr
    )
    assert "restored the data iterator position" in resumed.stderr
    # Bit-identical final weights and optimizer state (the logged digests agree too).
    assert DIGEST.findall(resumed.stderr) == DIGEST.findall(clean.stderr)
    expected = _tensors(f"{tmp_path / 'clean'}/ckpt-{MAX_ITERS}")
    got = _tensors(f"{logdir}/ckpt-{MAX_ITERS}")
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_sigterm_to_a_worker_checkpoints_the_step_on_every_worker_then_both_resume(tmp_path):
    from test_training_multiworker import SCRATCH, WORKERS, Workers, _checkpoint_step

    logdir = str(tmp_path / "run")
    workers = Workers(str(tmp_path), [logdir] * WORKERS, "--max_iters=1000000")
    try:
        _wait_for(
            workers.processes[0],
            workers.logs[0],
            lambda: _checkpoint_step(logdir) is not None,
            "first checkpoint",
        )
        workers.processes[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=TIMEOUT_S) for p in workers.processes]
    finally:
        workers.kill()
    texts = [workers.text(i) for i in range(WORKERS)]
    assert codes == [interrupts.EXIT_TERMINATED] * WORKERS, texts[0][-2000:] + texts[1][-2000:]
    saved = _checkpoint_step(logdir)
    for index, text in enumerate(texts):
        (error,) = _error_lines(text)
        assert (
            f"multi-worker training stopped at step {saved} on /job:worker/task:{index} "
            "for a preemption notice"
        ) in error
        assert f"the chief into {logdir}/ckpt-{saved}" in error
        assert "restart every worker with the same command" in error
    for scratch in SCRATCH.findall(texts[1]):
        assert not os.path.exists(scratch)

    target = saved + 2
    restarted = Workers(str(tmp_path), [logdir] * WORKERS, f"--max_iters={target}")
    assert restarted.wait() == [0] * WORKERS, restarted.text(0)[-3000:]
    for index in range(WORKERS):
        text = restarted.text(index)
        assert f"resumed from checkpoint {logdir}/ckpt-{saved} at step {saved}" in text
        assert f"training finished at step {target}" in text


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return export_saved_model(
        TinyDelgStandIn(), tmp_path_factory.mktemp("fx") / "export", EXTRACT_CONFIG
    )


def _assert_same_store(path_a, path_b):
    a, b = FeatureStore(path_a).arrays(), FeatureStore(path_b).arrays()
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_sigterm_during_extract_flushes_a_part_and_the_rerun_gives_the_same_store(
    tmp_path, export_dir
):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(NUM_IMAGES):
        Image.fromarray(random_image(IMAGE_SIDE, IMAGE_SIDE, seed=i)).save(
            images / f"img_{i:04d}.jpg"
        )
    common = [
        f"--images={images}",
        f"--model_path={export_dir}",
        f"--flush_every={FLUSH_EVERY}",
        "--noprogress",
    ]
    clean = _run("delg_tf.extract", [*common, f"--output_dir={tmp_path / 'clean'}"])
    assert clean.returncode == 0, clean.stderr[-3000:]

    out, log = tmp_path / "stopped", tmp_path / "extract.log"
    parts = out / "features.parts"
    process = _start("delg_tf.extract", [*common, f"--output_dir={out}"], log)
    try:
        _wait_for(
            process,
            log,
            lambda: parts.is_dir() and len(list(parts.glob("part-*.h5"))),
            "first part",
        )
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
    text = open(log).read()
    assert code == interrupts.EXIT_TERMINATED, text[-3000:]
    (error,) = _error_lines(text)
    match = re.search(
        r"extraction stopped by SIGTERM: the (\d+) image\(s\) extracted so far "
        rf"are in complete parts in {re.escape(str(parts))} \(the store is "
        r"resumable\); rerun the same command",
        error,
    )
    assert match, error
    done = int(match.group(1))
    assert 0 < done < NUM_IMAGES
    assert not (out / "features.h5").exists()
    assert not list(parts.glob("*.tmp"))
    flushed = FeatureStore(parts)  # every part complete (and verified when read)
    assert len(flushed.names) == done
    flushed.arrays()

    resumed = _run("delg_tf.extract", [*common, f"--output_dir={out}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{done} already done" in resumed.stdout
    _assert_same_store(tmp_path / "clean" / "features.h5", out / "features.h5")


def test_stop_requests_record_sigint_and_a_second_one_interrupts():
    with interrupts.stop_requests() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs between bytecodes
        assert stop.requested and stop.name == "SIGINT"
        error = stop.error("stopped")
        assert isinstance(error, interrupts.Interrupted)
        assert error.exit_code == interrupts.EXIT_INTERRUPTED == 130
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert interrupts.EXIT_TERMINATED == 143
