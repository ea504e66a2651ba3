"""Where a training run executes: its `tf.distribute` strategy, which worker is the
chief, and the TensorFlow runtime settings (op determinism, intra-op threads).
"""
from __future__ import annotations

import logging
import os

import tensorflow as tf

from delg_tf.training import config as config_lib
from delg_tf.training.config import ConfigError, TrainConfig

logger = logging.getLogger(__name__)

CHIEF_TASK = "chief"
WORKER_TASK = "worker"


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
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ConfigError(f"--strategy must be one of {', '.join(config_lib.STRATEGIES)}; "
                      f"received {name!r}.")


def is_chief(strategy) -> bool:
    """True for the worker that writes checkpoints and summaries (the only one when
    the strategy has no cluster: the chief task, else worker 0 of a chief-less cluster)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    if resolver.task_type == CHIEF_TASK:
        return True
    has_chief = CHIEF_TASK in (resolver.cluster_spec().as_dict() or {})
    return resolver.task_type == WORKER_TASK and resolver.task_id == 0 and not has_chief


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
                "TensorFlow is imported.") from e
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
        logger.info("deterministic run: TF op determinism on, %s intra-op threads",
                    threads or "default")
