"""The training loop: `train(config, model_config) -> Path`.

A custom loop around the model's own `train_step` (DELG, Cao et al. ECCV 2020,
Sec. 3 and 4.1; Glocal Retriever, Kim et al. 2023): the model computes its
losses and applies its gradients with tape-level gradient stopping; the loop
adds distribution (`tf.distribute`), the learning-rate schedule, TensorBoard
scalars, validation, checkpoints, resuming and the NaN guard.

Model contract (see `delg_tf.models.registry.build_model`):

* built with `model.build((None, H, W, 3))` (or by a forward pass on zeros);
* `model.compile(optimizer=...)` is called by the trainer;
* `model.train_step((images, labels))` applies the gradients once (one
  `optimizer.apply_gradients` call per step) and returns a dict of scalar
  metrics with at least "loss"; under a multi-replica strategy it scales its
  loss by `1 / num_replicas_in_sync` before taking gradients;
* `model.test_step((images, labels))` returns a dict of scalar metrics.

Layout of `logdir` (its record and checkpoints are read back by
`delg_tf.training.runs`)::

    config.json        resolved TrainConfig + model config (resume check)
    flags.txt          the same as a re-runnable flagfile
    checkpoint, ckpt-<step>.*   tf.train.CheckpointManager files
    train/, validation/        TensorBoard event files
    .delg_tf.lock      while training: the lock of the one writer (`delg_tf.locking`)

The optimizer and learning-rate schedule come from `delg_tf.training.optimization`,
the strategy and runtime settings from `delg_tf.training.runtime`.

Multi-worker runs (`--strategy=multi_worker`): every worker reads the whole input
pipeline and keeps its replicas' slices of each global batch (tf.data DATA sharding),
so the global batches are those of a single-process run with the same flags; every
worker must see the same --logdir (a shared folder), from which all of them resume;
only the chief writes into it. A lost worker stops the others with `WorkerLostError`.

Preemption: SIGTERM or SIGINT (a scheduler's preemption, `kill <pid>`, Ctrl-C) stops a
run at the next step boundary: it saves a checkpoint of that step, then raises
`delg_tf.interrupts.Terminated` / `Interrupted` (exit 143 / 130 from the command line)
naming it; rerunning the same command resumes from it (with the default strategy the
data iterator position is in the checkpoint too: the run ends with the weights of an
uninterrupted one). Damaged checkpoints: the run resumes from the newest checkpoint that
reads back whole (`delg_tf.training.runs.restorable_checkpoint`, a warning naming the
damaged one and the previous one used).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import keras
import numpy as np
import tensorflow as tf

from delg_tf import interrupts
from delg_tf.configs import ConfigError
from delg_tf.locking import output_lock
from delg_tf.training import config as config_lib
from delg_tf.training.config import TrainConfig
from delg_tf.training.optimization import make_learning_rate_schedule, make_optimizer
from delg_tf.training.runs import (
    CheckpointDamagedError,
    check_resume_config,
    checkpoint_step,
    restorable_checkpoint,
    write_config_files,
)
from delg_tf.training.runtime import (
    COLLECTIVE_FAILURES,
    configure_runtime,
    describe_collective_failure,
    is_chief,
    is_multi_worker,
    make_strategy,
    make_worker_scratch_dir,
    task_name,
)

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "ckpt"
# `delg_tf.convert_official` writes its checkpoint into OUT/checkpoint/.
INIT_FROM_SUBDIR = "checkpoint"
ITERATOR_CHECKPOINT_NAME = "data_iterator"
TRAIN_SUMMARY_DIR = "train"
VALIDATION_SUMMARY_DIR = "validation"
LEARNING_RATE_SUMMARY = "learning_rate"
STEPS_PER_SECOND_SUMMARY = "steps_per_second"
LOSS_METRIC = "loss"
SCALARS_PLUGIN_NAME = "scalars"
# Added to the data seed per resumed step when the iterator position is not
# checkpointed, so that a resumed run does not replay the first batches.
RESEED_MULTIPLIER = 1_000_003
# Prefix of the (empty) folder given to a multi-worker run's PreemptionCheckpointHandler.
PREEMPTION_SCRATCH_PREFIX = "delg_tf_preemption_"
# Name prefix of the handler's thread watching the other workers' preemption notices.
PREEMPTION_WATCHER_THREAD_PREFIX = "PeerTerminationWatcher-"
# Hex digits of the weights digest logged at the end of a run.
WEIGHTS_DIGEST_CHARS = 16


class TrainingError(RuntimeError):
    """Training cannot go on (the message is one line naming the cause and the fix)."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or Inf; nothing was saved from that state."""


class WorkerLostError(TrainingError):
    """A worker of a multi-worker run died or stopped answering; every worker must be
    restarted (they resume from the chief's last checkpoint).
    """


class WorkerTerminatedError(TrainingError):
    """This worker of a multi-worker run received SIGTERM (e.g. `kill <pid>`) and stopped;
    the others stop with `WorkerLostError`.
    """


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------


def model_config_class(family: str):
    """The config dataclass of a registered model family."""
    from delg_tf.models import registry

    if hasattr(registry, "model_config_class"):
        return registry.model_config_class(family)
    return registry._lookup(family)[1]  # pylint: disable=protected-access


def _config_fields(model_config) -> set:
    if dataclasses.is_dataclass(model_config):
        return {f.name for f in dataclasses.fields(model_config)}
    return set()


def resolve_model_config(
    config: TrainConfig, model_config, num_classes: int, num_examples: Optional[int] = None
):
    """Fills the model config from the training config and the data.

    * None -> the family's defaults;
    * `num_classes` (from --num_classes or the data);
    * `imagenet_weights` from --imagenet_weights when the model config has it;
    * `steps_per_epoch` (epoch-based schedules, e.g. Glocal's auxiliary loss) from the
      number of training examples and the batch size, when unset (0) and known.
    """
    if model_config is None:
        model_config = model_config_class(config.model_family)(num_classes=num_classes)
    fields = _config_fields(model_config)
    updates = {}
    if "num_classes" in fields:
        updates["num_classes"] = num_classes
    if "imagenet_weights" in fields and config.imagenet_weights:
        updates["imagenet_weights"] = config.imagenet_weights
    if (
        "steps_per_epoch" in fields
        and not getattr(model_config, "steps_per_epoch")
        and num_examples
    ):
        updates["steps_per_epoch"] = max(1, num_examples // config.batch_size)
    return dataclasses.replace(model_config, **updates) if updates else model_config


def _registry_model_fn(config: TrainConfig, model_config, load_imagenet: bool):
    from delg_tf.models import registry

    def build(num_classes):
        del num_classes  # Already in model_config.
        try:
            return registry.build_model(
                config.model_family, model_config, load_imagenet=load_imagenet
            )
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"model flags: {e}") from e

    return build


def _ensure_built(model, image_size: int):
    """Creates the model's variables before the optimizer and the checkpoint see them."""
    input_shape = (None, image_size, image_size, 3)
    if not model.built:
        model.build(input_shape)
    if not model.trainable_variables:
        model(tf.zeros((1, image_size, image_size, 3)), training=False)
    if not model.trainable_variables:
        raise TrainingError(
            f"model {model.name} has no trainable variables after "
            f"build({input_shape}); its build() must create its weights."
        )


def _latest_checkpoint(path: str) -> Optional[str]:
    """Checkpoint prefix of a folder (also its `checkpoint/` subfolder, as written by
    `delg_tf.convert_official`) or of a prefix.
    """
    for folder in (path, os.path.join(path, INIT_FROM_SUBDIR)):
        if tf.io.gfile.isdir(folder):
            latest = tf.train.latest_checkpoint(folder)
            if latest is not None:
                return latest
    if tf.io.gfile.exists(path + ".index"):
        return path
    return None


def _child_layers(model) -> list:
    return [
        (name, value)
        for name, value in vars(model).items()
        if isinstance(value, keras.layers.Layer) and not name.startswith("_")
    ]


def _initialise_from(model, init_from: str):
    """Restores model weights from a delg_tf checkpoint (fine-tuning start).

    Sub-layers whose weights do not fit (e.g. classifiers of another number of
    classes) keep their initial values; they are named in the log.
    """
    checkpoint_path = _latest_checkpoint(init_from)
    if checkpoint_path is None:
        raise ConfigError(
            f"--init_from={init_from} is not a delg_tf checkpoint (expected a "
            "folder with a 'checkpoint' file, or a ckpt-N prefix); fix the path "
            "or drop the flag."
        )
    try:
        status = tf.train.Checkpoint(model=model).restore(checkpoint_path)
        skipped = []
    except (ValueError, tf.errors.InvalidArgumentError):
        skipped = []
        for name, layer in _child_layers(model):
            holder = tf.Module()
            setattr(holder, name, layer)
            try:
                tf.train.Checkpoint(model=holder).restore(checkpoint_path).expect_partial()
            except (ValueError, tf.errors.InvalidArgumentError):
                skipped.append(name)
        restored = [name for name, _ in _child_layers(model) if name not in skipped]
        if not restored:
            raise ConfigError(
                f"--init_from={init_from}: no weight of it fits this model; "
                "check the model flags (backbone, dimensions)."
            ) from None
        logger.warning(
            "--init_from: %s do not fit this model (other shapes, e.g. another "
            "number of classes) and keep their initial values",
            ", ".join(skipped),
        )
        status = None
    if status is not None:
        try:
            status.assert_existing_objects_matched()
        except AssertionError:
            logger.warning(
                "--init_from=%s does not hold every model weight; the others keep "
                "their initial values.",
                checkpoint_path,
            )
        status.expect_partial()
    logger.info(
        "initialised the model from %s%s",
        checkpoint_path,
        f" (except {', '.join(skipped)})" if skipped else "",
    )


def _load_imagenet_weights(model, weights: Optional[str]):
    if not weights:
        return
    for owner in (model, getattr(model, "backbone", None)):
        loader = getattr(owner, "load_imagenet_weights", None)
        if loader is not None:
            loader(weights)
            logger.info("initialised the backbone from ImageNet weights %s", weights)
            return
    raise ConfigError(
        f"--imagenet_weights={weights}: model {model.name} has no "
        "load_imagenet_weights(); drop the flag or use --init_from."
    )


# --------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------


def _to_float(value) -> float:
    return float(tf.reduce_mean(tf.cast(value, tf.float32)).numpy())


def _non_finite_losses(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if LOSS_METRIC in k and not math.isfinite(v)}


def _format_metrics(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))


def _learning_rate_at(schedule, step: int) -> float:
    """The rate the optimizer used for its update number `step` (0-based)."""
    return float(schedule(step).numpy())


def _scalar_metadata() -> bytes:
    # What TensorBoard's scalar plugin writes (plugin "scalars", empty content), so
    # that scalars are written without the tensorboard package being installed.
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = SCALARS_PLUGIN_NAME
    return metadata.SerializeToString()


def _write_scalars(writer, metrics: dict, step: int):
    """Writes float scalars as TensorBoard "scalars" summaries at `step`."""
    if writer is None:
        return
    metadata = _scalar_metadata()
    with writer.as_default(step=step):
        for name, value in metrics.items():
            tf.summary.write(name, tf.constant(float(value), tf.float32), metadata=metadata)
    writer.flush()


def train(
    config: TrainConfig,
    model_config=None,
    *,
    model_fn: Optional[Callable] = None,
    data_fn: Optional[Callable] = None,
    strategy: Optional[tf.distribute.Strategy] = None,
) -> Path:
    """Trains (or resumes training) until `config.max_iters`.

    Args:
        config: training config (validated at construction).
        model_config: the model family's config (e.g. `DelgModelConfig`); None = the
            family's defaults. Its `num_classes` is filled from the data when unset.
        model_fn: optional `num_classes -> keras.Model` replacing the registry
            (tests, custom models); the model must follow the contract above.
        data_fn: optional `(config, seed) -> data.TrainData` replacing the data room.
        strategy: optional ready-made strategy (else built from `config.strategy`).

    Returns:
        The logdir (holding the checkpoints, `config.json`, `flags.txt`, events).

    Raises:
        ConfigError: bad config or a resumed logdir with another config.
        DataError: missing or empty data.
        NonFiniteLossError: the loss became NaN/Inf (the last good checkpoint is kept).
        WorkerLostError: a worker of a multi-worker run died or froze.
        WorkerTerminatedError: this worker of a multi-worker run received SIGTERM before
            its training loop (in the loop: `interrupts.Terminated`, see below).
        TrainingError: the workers of a multi-worker run resume from different steps, or
            no checkpoint of a resumed --logdir reads back.
        delg_tf.interrupts.Stopped: SIGTERM / SIGINT; a checkpoint of the step reached
            was saved (the message names it).
        LockedError: another run is training into `config.logdir` (one line naming it).
    """
    configure_runtime(config)
    strategy = strategy or make_strategy(config.strategy, config.tpu)
    if not is_multi_worker(strategy) or threading.current_thread() is not threading.main_thread():
        return _train(config, model_config, model_fn, data_fn, strategy)
    # TensorFlow's coordination service takes SIGTERM over (as a preemption notice that
    # nothing acts on): without this handler `kill <pid>` would not stop the worker. In the
    # training loop the PreemptionCheckpointHandler replaces it (`_preemption_handler`).
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm(config.logdir, strategy))
    try:
        return _train(config, model_config, model_fn, data_fn, strategy)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _train(config, model_config, model_fn, data_fn, strategy) -> Path:
    """One writer per --logdir (`delg_tf.locking`): the chief holds its lock for the whole
    run; the other workers of a multi-worker run only read it (they save to scratch
    folders).
    """
    if not is_chief(strategy):
        return _train_holding_logdir(config, model_config, model_fn, data_fn, strategy)
    with output_lock(config.logdir, f"--logdir={config.logdir}"):
        return _train_holding_logdir(config, model_config, model_fn, data_fn, strategy)


def _train_holding_logdir(config, model_config, model_fn, data_fn, strategy) -> Path:
    logdir = Path(config.logdir)
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ConfigError(
            f"--batch_size={config.batch_size} must be a multiple of the "
            f"{replicas} replicas of --strategy={config.strategy}."
        )
    chief = is_chief(strategy)
    multi_worker = is_multi_worker(strategy)
    if chief:
        write_dir = logdir
        write_dir.mkdir(parents=True, exist_ok=True)
    else:
        # Non-chief workers save too (saving may run collective ops), outside --logdir.
        write_dir = Path(make_worker_scratch_dir(strategy))
        atexit.register(shutil.rmtree, write_dir, ignore_errors=True)
        logger.info(
            "%s is not the chief: it reads --logdir=%s and saves its checkpoints "
            "to the scratch folder %s (deleted at the end)",
            task_name(strategy),
            logdir,
            write_dir,
        )

    try:
        latest = restorable_checkpoint(logdir)  # a damaged newest one: the previous one
    except CheckpointDamagedError as e:
        raise TrainingError(str(e)) from e
    resumed_step = 0
    if latest is not None:
        resumed_step = checkpoint_step(latest)

    keras.utils.set_random_seed(config.seed)
    iterator_trackable = config.save_iterator_state and config.strategy == "default"
    data_seed = config.seed
    if resumed_step and not iterator_trackable:
        data_seed = config.seed + RESEED_MULTIPLIER * resumed_step
    if data_fn is None:
        from delg_tf.training.data import make_train_data as data_fn
    data = data_fn(config, data_seed)
    num_classes = config.num_classes or data.num_classes
    if num_classes is None:
        raise ConfigError(
            f"cannot tell the number of classes of {data.description}; pass --num_classes."
        )
    logger.info(
        "data: %s, %d classes, global batch %d over %d replica(s)",
        data.description,
        num_classes,
        config.batch_size,
        replicas,
    )

    resolved = dataclasses.replace(config, num_classes=num_classes)
    fresh_start = latest is None
    if model_fn is None:
        model_config = resolve_model_config(config, model_config, num_classes, data.num_examples)
        build_fn = _registry_model_fn(
            config, model_config, load_imagenet=fresh_start and not config.init_from
        )
    else:
        build_fn = model_fn
    record = config_lib.config_record(resolved, model_config)
    if latest is not None:
        check_resume_config(logdir, record)
    if chief:
        write_config_files(logdir, record)

    with strategy.scope():
        model = build_fn(num_classes)
        _ensure_built(model, config.image_size)
        if hasattr(model, "global_batch_size"):
            model.global_batch_size = config.batch_size
        schedule = make_learning_rate_schedule(config)
        optimizer = make_optimizer(config, schedule)
        model.compile(optimizer=optimizer)
        optimizer.build(model.trainable_variables)
        step = tf.Variable(
            0,
            dtype=tf.int64,
            trainable=False,
            name="global_step",
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )

    train_iterator = iter(_distribute(strategy, data.train))
    objects = {"model": model, "optimizer": optimizer, "step": step}
    if iterator_trackable:
        objects[ITERATOR_CHECKPOINT_NAME] = train_iterator
    checkpoint = tf.train.Checkpoint(**objects)
    manager = tf.train.CheckpointManager(
        checkpoint,
        str(write_dir),
        max_to_keep=config.max_checkpoints_to_keep,
        checkpoint_name=CHECKPOINT_PREFIX,
        step_counter=step,
    )

    if latest is not None:
        _restore(latest, model, optimizer, step, train_iterator if iterator_trackable else None)
        logger.info(
            "resumed from checkpoint %s at step %d (training to step %d)%s",
            latest,
            int(step.numpy()),
            config.max_iters,
            "" if iterator_trackable else "; data position not restored, data order reseeded",
        )
        if config.init_from:
            logger.info("--init_from=%s ignored: resuming %s", config.init_from, logdir)
    else:
        logger.info("starting a new run in %s", logdir)
        if config.init_from:
            _initialise_from(model, config.init_from)
        elif model_fn is not None or "imagenet_weights" not in _config_fields(model_config):
            _load_imagenet_weights(model, config.imagenet_weights)

    if multi_worker:
        try:
            _check_workers_agree(strategy, step, logdir)
        except COLLECTIVE_FAILURES as e:
            raise _worker_lost_error(e, strategy, logdir, int(step.numpy())) from e
    start_step = int(step.numpy())
    if start_step >= config.max_iters:
        logger.info(
            "already trained to step %d >= --max_iters=%d: nothing to do",
            start_step,
            config.max_iters,
        )
        return logdir

    @tf.function
    def train_one_step(iterator):
        per_replica = strategy.run(model.train_step, args=(next(iterator),))
        step.assign_add(1)
        return {
            k: strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None)
            for k, v in per_replica.items()
        }

    @tf.function
    def validate_one_step(batch):
        per_replica = strategy.run(model.test_step, args=(batch,))
        return {
            k: strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None)
            for k, v in per_replica.items()
        }

    train_writer = validation_writer = None
    if chief:
        train_writer = tf.summary.create_file_writer(str(logdir / TRAIN_SUMMARY_DIR))
        validation_writer = tf.summary.create_file_writer(str(logdir / VALIDATION_SUMMARY_DIR))

    last_saved = latest
    tic, tic_step = time.perf_counter(), start_step
    current = saved_step = start_step
    # Single process: SIGTERM / SIGINT are recorded and acted on at the next step boundary.
    # Multi-worker: TensorFlow's PreemptionCheckpointHandler (see `_preemption_handler`).
    handlers = contextlib.ExitStack()
    stop = (
        interrupts.StopRequest()
        if multi_worker
        else handlers.enter_context(interrupts.stop_requests())
    )

    def save_preemption_checkpoint():
        nonlocal last_saved, saved_step
        saved_step = int(step.numpy())
        last_saved = manager.save(checkpoint_number=saved_step)
        logger.info("preemption: saved checkpoint %s", last_saved)

    preemption = (
        _preemption_handler(strategy, save_preemption_checkpoint, handlers)
        if multi_worker
        else None
    )
    try:
        while current < config.max_iters:
            if stop.requested:  # a step boundary: save this step, then stop.
                if saved_step != current:
                    last_saved = manager.save(checkpoint_number=current)
                saved = (
                    f"checkpoint {last_saved} saved"
                    if last_saved
                    else "no step trained, nothing saved"
                )
                raise stop.error(
                    f"training stopped by {stop.name} at step {current}/{config.max_iters}: "
                    f"{saved}; rerun the same command (same --logdir={logdir}) to resume "
                    f"from step {current}."
                )
            try:
                metrics = (
                    train_one_step(train_iterator)
                    if preemption is None
                    else preemption.run(train_one_step, train_iterator)
                )
            except (tf.errors.OutOfRangeError, StopIteration) as e:
                raise _empty_data_error(data, config, current) from e
            current = int(step.numpy())
            if current == start_step + 1 and int(optimizer.iterations.numpy()) != current:
                logger.warning(
                    "the optimizer made %d updates in %d steps: the model's "
                    "train_step should call apply_gradients once per step (the "
                    "learning-rate schedule follows optimizer.iterations).",
                    int(optimizer.iterations.numpy()),
                    current,
                )
            values = {k: _to_float(v) for k, v in metrics.items()}
            bad = _non_finite_losses(values)
            if bad:
                kept = (
                    f"the last good checkpoint {last_saved} is kept"
                    if last_saved
                    else "no checkpoint was written"
                )
                raise NonFiniteLossError(
                    f"non-finite loss at step {current} ({_format_metrics(bad)}); training "
                    f"stopped without saving, {kept}; lower --initial_lr or check the data."
                )
            lr = _learning_rate_at(schedule, current - 1)
            if current % config.summary_interval == 0 or current == config.max_iters:
                _write_scalars(train_writer, {**values, LEARNING_RATE_SUMMARY: lr}, current)
            if current % config.log_interval == 0 or current == config.max_iters:
                elapsed = max(time.perf_counter() - tic, 1e-9)
                rate = (current - tic_step) / elapsed
                tic, tic_step = time.perf_counter(), current
                logger.info(
                    "step %d/%d: %s lr=%.4g steps/s=%.2f",
                    current,
                    config.max_iters,
                    _format_metrics(values),
                    lr,
                    rate,
                )
                _write_scalars(train_writer, {STEPS_PER_SECOND_SUMMARY: rate}, current)
            if (
                data.validation is not None
                and config.validation_interval
                and (current % config.validation_interval == 0 or current == config.max_iters)
            ):
                _run_validation(
                    strategy,
                    validate_one_step,
                    data.validation,
                    config.validation_steps,
                    validation_writer,
                    current,
                )
            if current % config.checkpoint_interval == 0 or current == config.max_iters:
                last_saved, saved_step = manager.save(checkpoint_number=current), current
                logger.info("saved checkpoint %s", last_saved)
    except _PreemptionSaved:
        raise interrupts.Terminated(
            f"multi-worker training stopped at step {saved_step} on {task_name(strategy)} for "
            "a preemption notice (SIGTERM to a worker of the cluster): every worker saved "
            f"that step (the chief into {logdir / f'{CHECKPOINT_PREFIX}-{saved_step}'}); "
            "restart every worker with the same command to resume from it.",
            signal.SIGTERM,
        ) from None
    except COLLECTIVE_FAILURES as e:
        if not multi_worker:
            raise
        raise _worker_lost_error(e, strategy, logdir, current) from e
    finally:
        handlers.close()
        for writer in (train_writer, validation_writer):
            if writer is not None:
                writer.close()
        if not chief:
            shutil.rmtree(write_dir, ignore_errors=True)
    if preemption is not None:
        _stop_preemption_watchers(preemption)
    task = task_name(strategy)
    logger.info(
        "model weights at step %d: sha256 %s (%d variables)%s",
        current,
        weights_digest(model),
        len(model.weights),
        f" on {task}" if task else "",
    )
    logger.info("training finished at step %d; checkpoints in %s", current, logdir)
    return logdir


def weights_digest(model) -> str:
    """The first hex digits of the SHA-256 of the model's weights (paths, shapes, dtypes
    and bytes, in order): the same on every worker of a multi-worker run.
    """
    digest = hashlib.sha256()
    for weight in model.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
        digest.update(f"{weight.path}:{value.shape}:{value.dtype};".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()[:WEIGHTS_DIGEST_CHARS]


def _distribute(strategy, dataset):
    """The distributed dataset; across workers sharded by DATA (each worker keeps its
    replicas' slices of every global batch), so that the global batches do not depend
    on the number of workers or of files.
    """
    if is_multi_worker(strategy):
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA
        )
        dataset = dataset.with_options(options)
    return strategy.experimental_distribute_dataset(dataset)


def _check_workers_agree(strategy, step, logdir):
    """Every worker restored the same step (they read one shared --logdir)."""

    @tf.function
    def gather_steps():
        per_replica = strategy.run(lambda: tf.reshape(tf.identity(step), [1]))
        return strategy.gather(per_replica, axis=0)

    steps = [int(s) for s in gather_steps().numpy()]
    if len(set(steps)) > 1:
        raise TrainingError(
            f"the workers start from different steps {steps} (one per replica): every "
            f"worker must read the chief's checkpoints from the same --logdir={logdir} (a "
            "shared folder or a gs:// path); fix the folder and restart every worker."
        )


def _restart_advice(logdir) -> str:
    latest = tf.train.latest_checkpoint(str(logdir))
    resume = (
        f"resume from the chief's last checkpoint {latest}"
        if latest
        else "start over (no checkpoint was written yet)"
    )
    return f"restart every worker of TF_CONFIG with the same flags to {resume}"


def _worker_lost_error(error, strategy, logdir, step) -> WorkerLostError:
    return WorkerLostError(
        f"multi-worker training stopped at step {step} on {task_name(strategy)}: lost "
        f"{describe_collective_failure(error, strategy)}; {_restart_advice(logdir)}."
    )


def _stop_on_sigterm(logdir, strategy):
    """A SIGTERM handler raising WorkerTerminatedError (in the main thread)."""

    def stop(signum, frame):
        del frame
        raise WorkerTerminatedError(
            f"{task_name(strategy)} received {signal.Signals(signum).name} and stopped (the "
            f"other workers stop too); {_restart_advice(logdir)}."
        )

    return stop


class _PreemptionSaved(Exception):
    """Raised by the PreemptionCheckpointHandler's exit_fn once the checkpoint is saved."""


def _raise_preemption_saved():
    raise _PreemptionSaved()


def _preemption_handler(strategy, save, cleanup: contextlib.ExitStack):
    """TensorFlow's `PreemptionCheckpointHandler` for a multi-worker run, or None where it
    does nothing (Google Cloud CPU / TPU VMs: the SIGTERM handler of `train` stays).

    On SIGTERM to any worker, the handler (SIGTERM handler, coordination-service keys)
    makes every worker agree on the next step, call `save` there (our CheckpointManager:
    the chief into --logdir, the others into their scratch folders) and then its exit_fn,
    which raises `_PreemptionSaved`. The handler restores nothing: it gets an empty
    checkpoint and folder of its own (the trainer restores, damaged checkpoints
    included), and `save` replaces its saving.
    """
    from tensorflow.python.distribute.failure_handling import failure_handling_util

    if failure_handling_util.detect_platform() in (
        failure_handling_util.PlatformDevice.GCE_CPU,
        failure_handling_util.PlatformDevice.GCE_TPU,
    ):
        logger.warning(
            "PreemptionCheckpointHandler does nothing on this platform: SIGTERM "
            "stops the worker without a checkpoint"
        )
        return None
    folder = tempfile.mkdtemp(prefix=PREEMPTION_SCRATCH_PREFIX)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    cleanup.callback(shutil.rmtree, folder, ignore_errors=True)
    config = tf.distribute.experimental.TerminationConfig(
        exit_fn=_raise_preemption_saved, save_fn=save
    )
    _quiet_preemption_watcher_errors()
    handler = tf.distribute.experimental.PreemptionCheckpointHandler(
        strategy.cluster_resolver, tf.train.Checkpoint(), os.path.join(folder, "handler"), config
    )
    return handler


def _quiet_preemption_watcher_errors():
    """Logs in one line, without a traceback, the TensorFlow error ending the handler's
    watcher thread when a worker is lost (the coordination service is gone; the main
    thread reports it as `WorkerLostError`); other threads' errors as before.
    """
    previous = threading.excepthook
    if getattr(previous, "delg_tf_preemption", False):
        return

    def hook(args):
        thread = args.thread.name if args.thread is not None else ""
        if thread.startswith(PREEMPTION_WATCHER_THREAD_PREFIX) and issubclass(
            args.exc_type, tf.errors.OpError
        ):
            logger.info(
                "%s ended: %s: %s",
                thread,
                args.exc_type.__name__,
                " ".join(str(args.exc_value).split())[:200],
            )
            return
        previous(args)

    hook.delg_tf_preemption = True
    threading.excepthook = hook


def _stop_preemption_watchers(handler):
    """Ends the handler's watcher thread (blocked on a coordination-service key until the
    handler is deleted: what its __del__ does) once every worker finished training; left
    to die with the process after an error (a lost worker may never answer).
    """
    # pylint: disable=protected-access
    handler._stop_cluster_wise_termination_watcher_thread()
    handler._stop_poll_termination_signal_thread()


def _restore(path, model, optimizer, step, iterator):
    try:
        status = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step).restore(path)
    except tf.errors.DataLossError as e:  # damaged since `restorable_checkpoint` read it
        first_line = (e.message.splitlines() or [""])[0][:200]
        raise TrainingError(
            f"checkpoint {path} cannot be restored ({first_line}); rerun to "
            "resume from the previous one."
        ) from e
    try:
        status.assert_existing_objects_matched()
    except AssertionError as e:
        raise TrainingError(
            f"checkpoint {path} does not match this model "
            f"({str(e).splitlines()[0][:200]}); use a new --logdir."
        ) from e
    status.expect_partial()
    if iterator is not None:
        names = {name for name, _ in tf.train.list_variables(path)}
        if any(n.startswith(ITERATOR_CHECKPOINT_NAME + "/") for n in names):
            tf.train.Checkpoint(**{ITERATOR_CHECKPOINT_NAME: iterator}).restore(
                path
            ).expect_partial()
            logger.info("restored the data iterator position")


def _run_validation(strategy, step_fn, dataset, max_steps, writer, step):
    totals, count = {}, 0
    for batch in _distribute(strategy, dataset.take(max_steps)):
        metrics = step_fn(batch)
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + _to_float(v)
        count += 1
    if not count:
        logger.warning("validation at step %d: the validation data is empty", step)
        return
    means = {k: v / count for k, v in totals.items()}
    logger.info("validation at step %d (%d batches): %s", step, count, _format_metrics(means))
    _write_scalars(writer, means, step)


def _empty_data_error(data, config, step):
    from delg_tf.data.errors import DataError

    return DataError(
        f"the training data ran out at step {step}: {data.description} yields "
        f"no batch of --batch_size={config.batch_size}; check that the "
        "TFRecords hold examples (at least one batch) or lower --batch_size."
    )
