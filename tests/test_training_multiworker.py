"""`python -m delg_tf.train --strategy=multi_worker`: two worker processes on loopback ports.

Each worker gets a `TF_CONFIG` naming both (ports picked by binding to port 0 on
127.0.0.1). Checked: only the chief writes into --logdir; both workers end with the same
weights (the digest each logs); the run equals a single-process run of the same global
batch; a killed or frozen worker stops the other one with one clear error line within a
bounded time; restarting both resumes from the chief's last checkpoint; workers that do not
share --logdir are refused. A terminated (SIGTERM) worker: tests/test_faults_preemption.py
(every worker saves the step through TensorFlow's PreemptionCheckpointHandler).
"""

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from training_helpers import embedded_tiny_data_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = 2
LOOPBACK = "127.0.0.1"
RUN_TIMEOUT_S = 240
FIRST_CHECKPOINT_TIMEOUT_S = 120
# A survivor exits this soon after its peer is killed, terminated or frozen (measured: < 2 s
# when the peer dies in a collective op; 7-12 s through the coordination service's
# heartbeat timeout otherwise).
SURVIVOR_EXIT_TIMEOUT_S = 60
MAX_ITERS = 6
CHECKPOINT_INTERVAL = 2
EXTRA_STEPS = 4
EXIT_TRAINING_ERROR = 3  # delg_tf.train.EXIT_TRAINING_ERROR
# Two workers vs one process after MAX_ITERS steps, over every float tensor of the final
# checkpoint (weights, momentum slots): measured max |difference| 1.5e-7 (all-reduce
# sums the two half-batch gradients, one process sums the whole batch in one op).
ATOL, RTOL = 1e-6, 1e-5
# One intra-op thread per worker on a 2-core machine, and the same for the reference.
# Batch statistics are per replica (BN off), so that one process and two workers compute
# the same step (the gradient clipping of configs/demo.flags acts on the global gradient).
FLAGS = (
    "--flagfile=configs/demo.flags",
    "--embedded_preset=tiny",
    "--embedded_train_landmarks=0",
    "--batch_size=4",
    "--image_size=64",
    "--validation_interval=0",
    f"--checkpoint_interval={CHECKPOINT_INTERVAL}",
    "--log_interval=1",
    "--summary_interval=1",
    "--intra_op_threads=1",
    "--backbone_bn_training=false",
    "--attention_use_bn=false",
)
DIGEST = re.compile(r"model weights at step (\d+): sha256 (\w+)")
SCRATCH = re.compile(r"saves its checkpoints to the scratch folder (\S+)")
NOT_COMPARED = ("_CHECKPOINTABLE_OBJECT_GRAPH", "data_iterator/.ATTRIBUTES/ITERATOR_STATE")


def _free_ports(count):
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((LOOPBACK, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _env(tf_config=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return env


def _train_args(logdir, *extra):
    return [
        sys.executable,
        "-m",
        "delg_tf.train",
        *FLAGS,
        f"--data_dir={embedded_tiny_data_dir()}",
        f"--logdir={logdir}",
        *extra,
    ]


class Workers:
    """Two `delg_tf.train` processes of one TF_CONFIG cluster; logs in `folder`."""

    def __init__(self, folder, logdirs, *extra):
        cluster = {"worker": [f"{LOOPBACK}:{port}" for port in _free_ports(WORKERS)]}
        self.logs = [os.path.join(folder, f"worker{i}.log") for i in range(WORKERS)]
        self.processes = []
        for index, (logdir, log) in enumerate(zip(logdirs, self.logs)):
            tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
            with open(log, "w") as out:
                self.processes.append(
                    subprocess.Popen(
                        _train_args(logdir, "--strategy=multi_worker", *extra),
                        cwd=REPO,
                        env=_env(tf_config),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )

    def text(self, index):
        with open(self.logs[index]) as f:
            return f.read()

    def wait(self, timeout=RUN_TIMEOUT_S):
        try:
            return [p.wait(timeout=timeout) for p in self.processes]
        finally:
            self.kill()

    def kill(self):
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def _checkpoint_step(logdir):
    state = os.path.join(logdir, "checkpoint")
    if not os.path.isfile(state):
        return None
    match = re.search(r'^model_checkpoint_path: ".*ckpt-(\d+)"', open(state).read(), re.M)
    return int(match.group(1)) if match else None


def _digests(workers, step):
    return [dict(DIGEST.findall(workers.text(i))).get(str(step)) for i in range(WORKERS)]


def _float_tensors(prefix):
    reader = tf.train.load_checkpoint(prefix)
    tensors = {}
    for name, _ in tf.train.list_variables(prefix):
        if name in NOT_COMPARED:
            continue
        value = np.asarray(reader.get_tensor(name))
        if value.dtype.kind == "f":
            tensors[name] = value
    return tensors


@pytest.fixture(scope="module")
def two_worker_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("multi_worker")
    logdir = str(folder / "run")
    workers = Workers(str(folder), [logdir] * WORKERS, f"--max_iters={MAX_ITERS}")
    codes = workers.wait()
    assert codes == [0] * WORKERS, workers.text(0)[-3000:] + workers.text(1)[-3000:]
    return folder, logdir, workers


def test_only_the_chief_writes_into_the_logdir(two_worker_run):
    _, logdir, workers = two_worker_run
    chief, other = workers.text(0), workers.text(1)
    assert f"over {WORKERS} replica(s)" in chief
    assert f"saved checkpoint {logdir}/ckpt-{MAX_ITERS}" in chief
    scratch = SCRATCH.findall(other)
    assert len(scratch) == 1 and not SCRATCH.search(chief), other[-3000:]
    assert not os.path.realpath(scratch[0]).startswith(os.path.realpath(logdir))
    assert not os.path.exists(scratch[0]), "the non-chief left its scratch folder"
    assert f"saved checkpoint {scratch[0]}/ckpt-{MAX_ITERS}" in other
    kept = [f"ckpt-{MAX_ITERS - CHECKPOINT_INTERVAL}", f"ckpt-{MAX_ITERS}"]
    expected = {"checkpoint", "config.json", "flags.txt", "train", "validation"} | {
        f"{c}.{suffix}" for c in kept for suffix in ("index", "data-00000-of-00001")
    }
    assert set(os.listdir(logdir)) == expected
    # One writer of events: the chief (a second worker would add its own file).
    assert len(glob.glob(os.path.join(logdir, "train", "events.out.tfevents.*"))) == 1


def test_workers_end_with_identical_weights(two_worker_run):
    _, _, workers = two_worker_run
    digests = _digests(workers, MAX_ITERS)
    assert digests[0] is not None and digests == [digests[0]] * WORKERS, digests


def test_two_workers_equal_one_process_with_the_same_global_batch(two_worker_run):
    folder, logdir, _ = two_worker_run
    single = str(folder / "single")
    result = subprocess.run(
        _train_args(single, f"--max_iters={MAX_ITERS}"),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    multi = _float_tensors(os.path.join(logdir, f"ckpt-{MAX_ITERS}"))
    reference = _float_tensors(os.path.join(single, f"ckpt-{MAX_ITERS}"))
    earlier = _float_tensors(os.path.join(single, f"ckpt-{MAX_ITERS - CHECKPOINT_INTERVAL}"))
    assert multi.keys() == reference.keys() and len(multi) > 100
    for name, value in reference.items():
        np.testing.assert_allclose(multi[name], value, rtol=RTOL, atol=ATOL, err_msg=name)
    # The tolerance is far below what the last steps changed.
    moved = max(np.abs(value - earlier[name]).max() for name, value in reference.items())
    assert moved > 1000 * ATOL, moved


def test_workers_with_different_logdirs_are_refused(two_worker_run, tmp_path):
    _, logdir, _ = two_worker_run
    chief_logdir = str(tmp_path / "shared")
    shutil.copytree(logdir, chief_logdir)
    workers = Workers(
        str(tmp_path),
        [chief_logdir, str(tmp_path / "elsewhere")],
        f"--max_iters={MAX_ITERS + EXTRA_STEPS}",
    )
    assert workers.wait() == [EXIT_TRAINING_ERROR] * WORKERS, workers.text(0)[-3000:]
    for index in range(WORKERS):
        errors = [line for line in workers.text(index).splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, workers.text(index)[-3000:]
        assert f"different steps [{MAX_ITERS}, 0]" in errors[0]
        assert "same --logdir" in errors[0]


@pytest.mark.parametrize(
    "victim, how",
    [(0, signal.SIGKILL), (1, signal.SIGSTOP)],
    ids=["chief_killed", "worker_frozen"],
)
def test_lost_worker_stops_the_run_then_both_resume(tmp_path, victim, how):
    logdir = str(tmp_path / "run")
    workers = Workers(str(tmp_path), [logdir] * WORKERS, "--max_iters=1000000")
    survivor = 1 - victim
    try:
        deadline = time.time() + FIRST_CHECKPOINT_TIMEOUT_S
        while _checkpoint_step(logdir) is None:
            assert all(p.poll() is None for p in workers.processes), workers.text(0)[-3000:]
            assert time.time() < deadline, "no checkpoint written in time"
            time.sleep(0.2)
        workers.processes[victim].send_signal(how)
        lost_at = time.time()
        if how != signal.SIGSTOP:
            try:
                workers.processes[victim].wait(timeout=SURVIVOR_EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"worker {victim} ignored signal {how}")
        try:
            code = workers.processes[survivor].wait(timeout=SURVIVOR_EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"worker {survivor} still runs {SURVIVOR_EXIT_TIMEOUT_S} s after "
                f"worker {victim} got signal {how}"
            )
        waited = time.time() - lost_at
    finally:
        workers.kill()  # Also the frozen worker.
    text = workers.text(survivor)
    assert code == EXIT_TRAINING_ERROR, text[-3000:]
    assert "Traceback" not in text
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, text[-3000:]
    saved = _checkpoint_step(logdir)
    assert saved is not None and saved >= CHECKPOINT_INTERVAL
    assert "multi-worker training stopped at step" in errors[0]
    assert "restart every worker of TF_CONFIG" in errors[0]
    assert f"resume from the chief's last checkpoint {logdir}/ckpt-{saved}" in errors[0]
    for scratch in SCRATCH.findall(workers.text(1)):
        if victim == 1:  # No chance to clean up.
            shutil.rmtree(scratch, ignore_errors=True)
        assert not os.path.exists(scratch)
    print(f"survivor exited {waited:.1f} s after signal {how}: {errors[0]}")

    target = saved + EXTRA_STEPS
    restarted = Workers(str(tmp_path), [logdir] * WORKERS, f"--max_iters={target}")
    codes = restarted.wait()
    assert codes == [0] * WORKERS, restarted.text(0)[-3000:] + restarted.text(1)[-3000:]
    for index in range(WORKERS):
        text = restarted.text(index)
        assert f"resumed from checkpoint {logdir}/ckpt-{saved} at step {saved}" in text
        assert f"training finished at step {target}" in text
    assert _checkpoint_step(logdir) == target
    digests = _digests(restarted, target)
    assert digests[0] is not None and digests == [digests[0]] * WORKERS, digests
