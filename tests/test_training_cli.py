"""`python -m delg_tf.train` in subprocesses: clear errors, kill -9 then resume, mirrored."""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from training_helpers import TINY_DELG_FLAGS, embedded_tiny_data_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_CHECKPOINT_TIMEOUT_S = 120
RUN_TIMEOUT_S = 240
EXTRA_STEPS = 6


def _env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    return env


def _train(args, timeout=RUN_TIMEOUT_S):
    return subprocess.run(
        [sys.executable, "-m", "delg_tf.train", *args],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _assert_one_line_error(result, *needles):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--flagfile=configs/r50.flags", "--no_such_flag=1"], ["no_such_flag"]),
        (
            ["--flagfile=configs/missing.flags"],
            ["--flagfile=configs/missing.flags", "does not exist"],
        ),
        (
            ["--flagfile=configs/r50.flags", "--train_file_pattern=/nonexistent/gldv2/train-*"],
            ["/nonexistent/gldv2/train-*", "build_tfrecords"],
        ),
    ],
)
def test_bad_input_gives_one_line_error(args, needles):
    _assert_one_line_error(_train(args), *needles)


def test_empty_tfrecords_give_one_line_error(tmp_path):
    (tmp_path / "train-00000-of-00001").write_bytes(b"")
    result = _train(
        [
            "--flagfile=configs/r50.flags",
            f"--logdir={tmp_path / 'run'}",
            f"--train_file_pattern={tmp_path}/train-*",
        ]
    )
    _assert_one_line_error(result, str(tmp_path), "empty")


def _checkpoint_step(logdir):
    state = os.path.join(logdir, "checkpoint")
    if not os.path.isfile(state):
        return None
    match = re.search(r'^model_checkpoint_path: ".*ckpt-(\d+)"', open(state).read(), re.M)
    return int(match.group(1)) if match else None


def test_kill_during_training_then_resume(tmp_path):
    logdir = str(tmp_path / "run")
    args = [
        *TINY_DELG_FLAGS,
        f"--data_dir={embedded_tiny_data_dir()}",
        f"--logdir={logdir}",
        "--checkpoint_interval=3",
        "--validation_interval=0",
    ]
    with open(tmp_path / "first.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "delg_tf.train", *args, "--max_iters=1000000"],
            cwd=REPO,
            env=_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.time() + FIRST_CHECKPOINT_TIMEOUT_S
            while _checkpoint_step(logdir) is None:
                assert process.poll() is None, open(tmp_path / "first.log").read()[-3000:]
                assert time.time() < deadline, "no checkpoint written in time"
                time.sleep(0.2)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
    assert process.returncode == -signal.SIGKILL
    saved = _checkpoint_step(logdir)
    assert saved >= 3
    target = saved + EXTRA_STEPS
    result = _train([*args, f"--max_iters={target}"])
    assert result.returncode == 0, result.stderr[-3000:]
    match = re.search(r"resumed from checkpoint \S+ckpt-(\d+) at step (\d+)", result.stderr)
    assert match, result.stderr[-3000:]
    assert int(match.group(2)) == saved > 0
    assert f"training finished at step {target}" in result.stderr
    assert _checkpoint_step(logdir) == target
    assert "--max_iters changed" in result.stderr


MIRRORED_SCRIPT = textwrap.dedent("""
    import logging, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    logging.basicConfig(level=logging.INFO)
    from delg_tf.models.delg import DelgModelConfig
    from delg_tf.training.config import TrainConfig
    from delg_tf.training.trainer import train
    config = TrainConfig(logdir=sys.argv[1], data_source="embedded", data_dir=sys.argv[2],
                         embedded_preset="tiny", strategy="mirrored", max_iters=4,
                         batch_size=4, image_size=64, checkpoint_interval=4, log_interval=2,
                         summary_interval=1, validation_interval=4, validation_steps=1)
    train(config, DelgModelConfig(num_classes=1, backbone="tiny", embedding_dim=32,
                                  local_dim=8, attention_hidden=16))
""")


def test_mirrored_strategy_on_two_logical_cpus(tmp_path):
    logdir = str(tmp_path / "run")
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT, logdir, embedded_tiny_data_dir()],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "over 2 replica(s)" in result.stderr
    assert re.search(r"step 4/4: .*loss=\d", result.stderr)
    assert "validation at step 4" in result.stderr
    assert _checkpoint_step(logdir) == 4
