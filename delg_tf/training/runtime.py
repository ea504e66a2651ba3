"""Where a training run executes: its `tf.distribute` strategy, which worker is the
chief, and the TensorFlow runtime settings (op determinism, intra-op threads).

Multi-worker runs (`--strategy=multi_worker`, `tf.distribute.MultiWorkerMirroredStrategy`
configured by the `TF_CONFIG` environment variable of each worker): the chief writes
the checkpoints and summaries into --logdir, the other workers write their (required,
identical) checkpoints to a scratch folder of the system temp folder that they delete
at the end. A worker that dies or stops answering is detected by TensorFlow's
coordination service (heartbeats, about 10 s) or by the failing collective op; the
survivors' collective ops then fail with one of `COLLECTIVE_FAILURES`, which the
trainer reports as `WorkerLostError`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile

import tensorflow as tf

from delg_tf.configs import ConfigError
from delg_tf.training import config as config_lib
from delg_tf.training.config import TrainConfig

logger = logging.getLogger(__name__)

CHIEF_TASK = "chief"
WORKER_TASK = "worker"
TF_CONFIG_VARIABLE = "TF_CONFIG"
# Prefix of a non-chief worker's scratch checkpoint folder (in the system temp folder).
WORKER_SCRATCH_PREFIX = "delg_tf_worker_"
# What a collective op raises on the survivors when a worker of the cluster is gone
# (connection reset, missed coordination-service heartbeats, aborted collectives).
COLLECTIVE_FAILURES = (
    tf.errors.UnavailableError,
    tf.errors.DeadlineExceededError,
    tf.errors.AbortedError,
    tf.errors.CancelledError,
)
FAILURE_DETAIL_CHARS = 200
_TASK_PATTERN = re.compile(r"/job:(\w+)/replica:\d+/task:(\d+)")
# Lines of a collective error that say what happened (the first line is usually
# "Graph execution error:").
_FAILURE_DETAIL = re.compile(
    r"connection|socket|heartbeat|unhealthy|deadline|unavailable|"
    r"aborted|cancel|crashed|failed to connect",
    re.IGNORECASE,
)


def make_strategy(name: str, tpu: str = "") -> tf.distribute.Strategy:
    """The tf.distribute strategy for `--strategy`.

    "mirrored" uses every GPU, or every logical CPU device when there is no GPU
    (e.g. two devices made with `tf.config.set_logical_device_configuration`).
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices=devices)
    if name == "multi_worker":
        return _multi_worker_strategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ConfigError(
        f"--strategy must be one of {', '.join(config_lib.STRATEGIES)}; received {name!r}."
    )


def _multi_worker_strategy() -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy of the cluster in TF_CONFIG (checked first)."""
    raw = os.environ.get(TF_CONFIG_VARIABLE, "")
    if not raw:
        logger.warning(
            "--strategy=multi_worker without %s: this process trains alone; set "
            "%s on every worker (docs/readme_training.md, multi-worker training).",
            TF_CONFIG_VARIABLE,
            TF_CONFIG_VARIABLE,
        )
        return tf.distribute.MultiWorkerMirroredStrategy()
    try:
        tf_config = json.loads(raw)
        workers = tf_config["cluster"][tf_config["task"]["type"]]
        index = int(tf_config["task"]["index"])
        if not 0 <= index < len(workers):
            raise IndexError(index)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise ConfigError(
            f"--strategy=multi_worker: {TF_CONFIG_VARIABLE} must be JSON such as "
            '{"cluster": {"worker": ["host0:port", "host1:port"]}, "task": {"type": '
            '"worker", "index": 0}} with the task in the cluster; received '
            f"{raw[:200]!r}; fix {TF_CONFIG_VARIABLE} of this worker."
        ) from e
    return tf.distribute.MultiWorkerMirroredStrategy()


def is_chief(strategy) -> bool:
    """True for the worker that writes checkpoints and summaries (the only one when
    the strategy has no cluster: the chief task, else worker 0 of a chief-less cluster).
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    if resolver.task_type == CHIEF_TASK:
        return True
    has_chief = CHIEF_TASK in (resolver.cluster_spec().as_dict() or {})
    return resolver.task_type == WORKER_TASK and resolver.task_id == 0 and not has_chief


def is_multi_worker(strategy) -> bool:
    """True for a MultiWorkerMirroredStrategy whose TF_CONFIG cluster has two or more
    training tasks (chief and workers).
    """
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    spec = strategy.cluster_resolver.cluster_spec()
    return sum(spec.num_tasks(job) for job in spec.jobs if job in (CHIEF_TASK, WORKER_TASK)) > 1


def task_name(strategy) -> str:
    """This worker's task as TensorFlow names it, e.g. "/job:worker/task:1" ("" without
    a cluster).
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return ""
    return f"/job:{resolver.task_type}/task:{resolver.task_id}"


def make_worker_scratch_dir(strategy) -> str:
    """A new scratch folder for a non-chief worker's checkpoints (outside --logdir, so
    that even a killed worker leaves nothing in it).
    """
    task = task_name(strategy).replace("/job:", "").replace("/task:", "")
    return tempfile.mkdtemp(prefix=f"{WORKER_SCRATCH_PREFIX}{task or 'local'}_")


def describe_collective_failure(error, strategy) -> str:
    """`<peer> (<ErrorType>: <what happened>)` for a `COLLECTIVE_FAILURES` error: the
    other worker named in the message (if any) and its most telling line.
    """
    message = getattr(error, "message", None) or str(error)
    own = task_name(strategy)
    peers = [f"/job:{job}/task:{task}" for job, task in _TASK_PATTERN.findall(message)]
    peers = [p for p in dict.fromkeys(peers) if p != own]
    lines = [line.strip(" :") for line in message.splitlines() if line.strip(" :")]
    details = [line for line in lines if _FAILURE_DETAIL.search(line)]
    detail = (details or lines or [type(error).__name__])[0]
    detail = " ".join(detail.split())[:FAILURE_DETAIL_CHARS]
    peer = f"worker {peers[0]}" if peers else "a worker of the cluster"
    return f"{peer} ({type(error).__name__}: {detail})"


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def configure_runtime(config: TrainConfig) -> None:
    """Applies ``config.deterministic`` and ``config.intra_op_threads`` to TensorFlow.

    Call before TensorFlow runs its first op in the process (the trainer does so
    first thing): the intra-op thread count cannot change afterwards.

    Raises:
        ConfigError: the thread count cannot be applied any more.
    """
    threads = config.resolved_intra_op_threads
    current = tf.config.threading.get_intra_op_parallelism_threads()
    same = current == threads or (current == 0 and threads == _available_cores())
    if threads and not same:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
        except RuntimeError as e:
            raise ConfigError(
                f"--intra_op_threads={threads} (--deterministic="
                f"{config.deterministic}) cannot be applied: TensorFlow already runs ops in "
                f"this process with {current or 'its default number of'} intra-op threads; "
                f"start a new process, or set TF_NUM_INTRAOP_THREADS={threads} before "
                "TensorFlow is imported."
            ) from e
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
        logger.info(
            "deterministic run: TF op determinism on, %s intra-op threads", threads or "default"
        )
