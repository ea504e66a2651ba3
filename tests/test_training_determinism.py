"""`train --deterministic`: two runs of the demo config give identical weights, also
when the process may use another number of cores (the intra-op thread count is fixed).

Each run is a fresh `python -m delg_tf.train` process (the thread count and TF op
determinism are process-wide and must be set before TensorFlow runs an op).
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from delg_tf.training.config import DETERMINISTIC_INTRA_OP_THREADS, TrainConfig

REPO = Path(__file__).resolve().parent.parent
STEPS = 20


def _train(logdir, data_dir, *extra, cores=None):
    command = [
        sys.executable,
        "-m",
        "delg_tf.train",
        f"--flagfile={REPO / 'configs' / 'demo.flags'}",
        f"--logdir={logdir}",
        f"--data_dir={data_dir}",
        f"--max_iters={STEPS}",
        "--validation_interval=0",
        f"--checkpoint_interval={STEPS}",
        *extra,
    ]
    preexec = None
    if cores is not None:

        def preexec():
            os.sched_setaffinity(0, cores)

    done = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, preexec_fn=preexec, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr + done.stdout


def _weights(logdir):
    path = tf.train.latest_checkpoint(str(logdir))
    reader = tf.train.load_checkpoint(path)
    return {
        name: reader.get_tensor(name)
        for name, _ in tf.train.list_variables(path)
        if name.startswith("model/") and "OPTIMIZER" not in name
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("determinism")
    data = root / "data"
    logs = {}
    # configs/demo.flags sets --deterministic.
    logs["a"] = _train(root / "a", data)
    logs["b"] = _train(root / "b", data)
    logs["one_core"] = _train(root / "one_core", data, cores={sorted(os.sched_getaffinity(0))[0]})
    logs["nondeterministic"] = _train(root / "nondeterministic", data, "--nodeterministic")
    return root, logs


def test_demo_flags_ask_for_determinism():
    text = (REPO / "configs" / "demo.flags").read_text().split()
    assert "--deterministic" in text


def test_two_runs_give_identical_weights(runs):
    root, logs = runs
    assert "deterministic run: TF op determinism on" in logs["a"]
    a, b = _weights(root / "a"), _weights(root / "b")
    assert len(a) > 10 and a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_fewer_cores_same_weights(runs):
    """The thread count, not the cores the process may use, decides the arithmetic."""
    root, _ = runs
    a, one = _weights(root / "a"), _weights(root / "one_core")
    for name in a:
        np.testing.assert_array_equal(a[name], one[name], err_msg=name)


def test_nondeterministic_run_trains_without_the_settings(runs):
    root, logs = runs
    assert "deterministic run" not in logs["nondeterministic"]
    weights = _weights(root / "nondeterministic")
    assert all(np.all(np.isfinite(v)) for v in weights.values())


def test_resolved_threads():
    base = dict(logdir="x", data_source="embedded")
    assert TrainConfig(**base).resolved_intra_op_threads == 0
    assert (
        TrainConfig(**base, deterministic=True).resolved_intra_op_threads
        == DETERMINISTIC_INTRA_OP_THREADS
    )
    assert (
        TrainConfig(**base, deterministic=True, intra_op_threads=3).resolved_intra_op_threads == 3
    )
    assert TrainConfig(**base, intra_op_threads=1).resolved_intra_op_threads == 1
