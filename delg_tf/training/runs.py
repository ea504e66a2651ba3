"""A training run on disk: its record (`config.json`), checkpoints and restored model.

A `delg_tf.train` logdir holds::

    config.json        {"train": TrainConfig fields, "model": model config fields}
    flags.txt          the same as a re-runnable flagfile
    checkpoint, ckpt-<step>.*   tf.train.CheckpointManager files ("model", "optimizer",
                                "step" and optionally the data iterator)

The trainer writes the record (`write_config_files`) and checks a resumed run
against it (`check_resume_config`); export and evaluation rebuild the model it
describes (`load_run`), for every model family (DELG, Cao et al. ECCV 2020; Glocal
Retriever, Kim et al. 2023). This module does not import the training loop.

Damaged checkpoints: TensorFlow stores a CRC32C of every tensor of a checkpoint;
`restorable_checkpoint` reads every tensor of the newest checkpoint of a logdir back
(`checkpoint_damage`) and, if one fails (bytes flipped, a truncated or missing file),
falls back to the previous one (`all_model_checkpoint_paths`) with a warning naming
both; when none restores, one `CheckpointDamagedError` line names the logdir and the fix.
The trainer resumes from it and `load_run` restores it.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Optional

from delg_tf.atomic import write_json_atomic, write_text_atomic
from delg_tf.configs import MODEL_FAMILIES, ConfigError
from delg_tf.training import config as config_lib

logger = logging.getLogger(__name__)

# `checkpoint` value of `load_run`: the run's model at its random initialisation
# (seeded with the run's --seed; ImageNet backbone if the run used one), i.e. the
# "before training" baseline.
UNTRAINED = "untrained"
# The family of a record written before the trainer had families.
DEFAULT_FAMILY = "delg"
# Families restored with the run's optimizer attached: the Glocal model owns its
# proxies' optimizer (made by `compile`) and its auxiliary-loss schedule reads the
# optimizer's step, so a restored run needs both optimizers' state. DELG runs restore
# the model's weights only.
FAMILIES_RESTORED_WITH_OPTIMIZER = frozenset({"glocal"})
STEP_CHECKPOINT_KEY = "step/.ATTRIBUTES/VARIABLE_VALUE"
CHECKPOINT_INDEX_SUFFIX = ".index"
ERROR_EXCERPT_CHARS = 200
# Tensors read back per RestoreV2 call when verifying a checkpoint (bounded memory).
VERIFY_TENSORS_PER_READ = 64


class RunError(ValueError):
    """A run folder cannot be loaded (one line naming the file and the fix)."""


class RunNotFoundError(RunError, FileNotFoundError):
    """The run's `config.json` or checkpoint is missing."""


class CheckpointDamagedError(RunError):
    """No checkpoint of a logdir (or the one asked for) can be read back."""


def config_path(logdir) -> Path:
    """`<logdir>/config.json`."""
    return Path(logdir) / config_lib.CONFIG_JSON_NAME


def is_run(path) -> bool:
    """True when `path` is a folder holding a run record (`config.json`)."""
    return config_path(path).is_file()


def read_run_record(logdir, flag: str = "logdir") -> dict:
    """The `config.json` record of a `delg_tf.train` logdir.

    Args:
      logdir: the run's --logdir.
      flag: the flag that named `logdir`, for the error message.

    Raises:
      RunNotFoundError: no `config.json`. RunError: not valid JSON.
    """
    path = config_path(logdir)
    if not path.is_file():
        raise RunNotFoundError(
            f"{path} not found; --{flag} must be the --logdir of a python -m delg_tf.train "
            "run (config.json + ckpt-N files). Official DELG SavedModels are used directly "
            "(DelgExtractor.from_saved_model) or converted with delg_tf.convert_official."
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise RunError(
            f"{path} is not valid JSON ({e}); expected the config.json written by delg_tf.train."
        ) from e


def run_family(record: dict, source=config_lib.CONFIG_JSON_NAME) -> str:
    """The model family of a run record ("delg" when the record predates families).

    Raises:
      RunError: a family the trainer does not know (`source` names the file).
    """
    family = record.get("train", {}).get("model_family", DEFAULT_FAMILY)
    if family not in MODEL_FAMILIES:
        raise RunError(
            f"{source}: model_family {family!r} is not a delg_tf model family; "
            f"expected one of {', '.join(MODEL_FAMILIES)}."
        )
    return family


def run_train_config(record: dict, source=config_lib.CONFIG_JSON_NAME):
    """The run's `TrainConfig` (fields added since the record was written at their
    defaults).
    """
    try:
        return config_lib.TrainConfig.from_dict(
            config_lib.with_train_defaults(record.get("train", {}))
        )
    except ConfigError as e:
        raise RunError(f"{source}: {e}") from e


def checkpoint_step(path) -> int:
    """The trainer's step counter saved in the checkpoint `path` (a ckpt-N prefix)."""
    import tensorflow as tf

    return int(tf.train.load_checkpoint(path).get_tensor(STEP_CHECKPOINT_KEY))


def checkpoint_damage(path) -> Optional[str]:
    """None if every tensor of checkpoint `path` reads back (TensorFlow checks each one's
    CRC32C), else the first line of the failure (data loss, truncated or missing file).
    """
    import tensorflow as tf

    try:
        dtypes = tf.train.load_checkpoint(path).get_variable_to_dtype_map()
        names = sorted(dtypes)
        for start in range(0, len(names), VERIFY_TENSORS_PER_READ):
            group = names[start : start + VERIFY_TENSORS_PER_READ]
            # RestoreV2 reads any dtype (the data iterator's state is a DT_VARIANT).
            tf.raw_ops.RestoreV2(
                prefix=path,
                tensor_names=group,
                shape_and_slices=[""] * len(group),
                dtypes=[dtypes[name] for name in group],
            )
    except (tf.errors.OpError, ValueError, OSError) as e:
        text = getattr(e, "message", None) or str(e) or type(e).__name__
        text = re.sub(r"\{\{function_node [^}]*\}\}|\[Op:\w+\]", "", text)
        return " ".join(text.split())[:ERROR_EXCERPT_CHARS]
    return None


def _listed_checkpoints(logdir) -> list:
    """The checkpoints of `logdir`'s `checkpoint` file, oldest first (newest last)."""
    import tensorflow as tf

    state = tf.train.get_checkpoint_state(str(logdir))
    if state is None or not state.model_checkpoint_path:
        return []
    paths = [p for p in state.all_model_checkpoint_paths if p != state.model_checkpoint_path]
    return paths + [state.model_checkpoint_path]


def restorable_checkpoint(logdir, flag: str = "logdir") -> Optional[str]:
    """The newest checkpoint of `logdir` that reads back whole (see the module doc).

    A damaged one is skipped for the previous one with a warning naming both.

    Returns:
      The checkpoint prefix, or None when `logdir` has no checkpoint.

    Raises:
      CheckpointDamagedError: no listed checkpoint reads back (names `logdir`, the fix).
    """
    paths = _listed_checkpoints(logdir)
    failures = []
    for path in reversed(paths):
        damage = checkpoint_damage(path)
        if damage is None:
            return path
        failures.append(path)
        older = paths[: len(paths) - len(failures)]
        logger.warning(
            "checkpoint %s cannot be restored (%s); %s",
            path,
            damage,
            f"falling back to the previous checkpoint {older[-1]}"
            if older
            else "no previous checkpoint is listed",
        )
    if not failures:
        return None
    raise CheckpointDamagedError(
        f"--{flag}={logdir}: none of its {len(failures)} checkpoint(s) can be restored "
        f"({', '.join(failures)}: damaged, see the warnings above); fix: restore them from "
        "a backup, or move the ckpt-* files and the 'checkpoint' file out of the folder to "
        "start the run over (or use a new --logdir)."
    )


def resolve_checkpoint(
    logdir, checkpoint: Optional[str] = None, flag: str = "checkpoint", logdir_flag: str = "logdir"
) -> str:
    """The checkpoint prefix to restore: `checkpoint`, else the newest restorable one in
    `logdir` (`restorable_checkpoint`: a damaged one falls back to the previous).

    Raises:
      RunNotFoundError: no checkpoint in `logdir`, or `checkpoint` has no `.index` file.
      CheckpointDamagedError: `checkpoint`, or every checkpoint of `logdir`, is damaged.
    """
    import tensorflow as tf

    path = checkpoint or restorable_checkpoint(logdir, logdir_flag)
    if path is None:
        raise RunNotFoundError(
            f"no checkpoint in {logdir} (no 'checkpoint' file / ckpt-N); "
            f"train first or pass a checkpoint prefix (--{flag})."
        )
    if not tf.io.gfile.exists(path + CHECKPOINT_INDEX_SUFFIX):
        raise RunNotFoundError(
            f"checkpoint {path} not found (no {path}"
            f"{CHECKPOINT_INDEX_SUFFIX}); pass a prefix such as "
            f"{logdir}/ckpt-N (--{flag})."
        )
    if checkpoint:
        damage = checkpoint_damage(path)
        if damage is not None:
            raise CheckpointDamagedError(
                f"--{flag}={path} cannot be restored ({damage}); pass another checkpoint of "
                f"the run (or none: the newest one of {logdir} that reads back is used)."
            )
    return path


def untrained_model(record: dict):
    """The run's architecture at its seeded initialisation (no checkpoint)."""
    import keras

    from delg_tf.models import registry

    keras.utils.set_random_seed(int(record["train"].get("seed", 0)))
    model_config = record["model"]
    return registry.build_model(
        run_family(record), model_config, load_imagenet=bool(model_config.get("imagenet_weights"))
    )


def _attach_optimizer(model, record: dict, source):
    """Compiles `model` with the run's optimizer (slots built); returns the optimizer."""
    from delg_tf.training.optimization import make_learning_rate_schedule, make_optimizer

    train_config = run_train_config(record, source)
    optimizer = make_optimizer(train_config, make_learning_rate_schedule(train_config))
    model.compile(optimizer=optimizer)
    optimizer.build(model.trainable_variables)
    return optimizer


def load_run(
    logdir,
    checkpoint: Optional[str] = None,
    *,
    family: Optional[str] = None,
    flag: str = "logdir",
    checkpoint_flag: str = "checkpoint",
):
    """Rebuilds the model of a `delg_tf.train` run and restores its checkpoint.

    Args:
      logdir: the run's --logdir (its `config.json` says how to build the model).
      checkpoint: a checkpoint prefix; default the latest in `logdir`; `UNTRAINED`
        for the run's model at its seeded random initialisation.
      family: the family the caller expects (None = any).
      flag, checkpoint_flag: the flags naming `logdir` and `checkpoint`, for messages.

    Returns:
      The restored Keras model (a Glocal model compiled with the run's optimizer, whose
      state is restored too; see `FAMILIES_RESTORED_WITH_OPTIMIZER`).

    Raises:
      RunNotFoundError: no `config.json` or no such checkpoint. RunError: another family
        than `family`, or a checkpoint that does not fit the model of `config.json`.
      CheckpointDamagedError: `checkpoint`, or every checkpoint of `logdir`, is damaged
        (a damaged newest one falls back to the previous, with a warning).
    """
    import tensorflow as tf

    from delg_tf.models import registry

    source = config_path(logdir)
    record = read_run_record(logdir, flag)
    actual = run_family(record, source)
    if family is not None and actual != family:
        raise RunError(
            f"--{flag}={logdir} is a {actual!r} run ({source}); expected a {family!r} run."
        )
    if checkpoint == UNTRAINED:
        return untrained_model(record)
    path = resolve_checkpoint(logdir, checkpoint, checkpoint_flag, flag)
    model = registry.build_model(actual, record["model"], load_imagenet=False)
    objects = {"model": model}
    if actual in FAMILIES_RESTORED_WITH_OPTIMIZER:
        objects["optimizer"] = _attach_optimizer(model, record, source)
    try:
        status = tf.train.Checkpoint(**objects).restore(path)
        status.expect_partial().assert_existing_objects_matched()
    except tf.errors.DataLossError as e:
        raise CheckpointDamagedError(
            f"checkpoint {path} cannot be restored "
            f"({' '.join(e.message.split())[:ERROR_EXCERPT_CHARS]}); "
            "pass another checkpoint of the run."
        ) from e
    except (
        AssertionError,
        ValueError,
        tf.errors.NotFoundError,
        tf.errors.InvalidArgumentError,
    ) as e:
        first_line = (str(e).splitlines() or [type(e).__name__])[0][:ERROR_EXCERPT_CHARS]
        raise RunError(
            f"checkpoint {path} does not match the model of {source} "
            f"({first_line}); pass a checkpoint of this run."
        ) from e
    return model


# --------------------------------------------------------------------------
# Writing the record and checking a resumed run against it (the trainer)
# --------------------------------------------------------------------------


def write_config_files(logdir: Path, record: dict):
    """Writes `config.json` and the re-runnable `flags.txt` into `logdir`."""
    logdir = Path(logdir)
    write_json_atomic(
        record, logdir / config_lib.CONFIG_JSON_NAME, indent=2, sort_keys=True, end="\n"
    )
    write_text_atomic(logdir / config_lib.FLAGS_TXT_NAME, config_lib.flags_text(record))


def check_resume_config(logdir: Path, record: dict):
    """Compares the config of a run to the one saved in `logdir` that it resumes.

    Rule: the model config must be identical; training fields may differ only in
    `config.RESUMABLE_CHANGES` (durations, intervals, data paths, strategy).

    Raises:
        ConfigError: listing the differing flags (saved vs received) and the fix.
    """
    logdir = Path(logdir)
    path = logdir / config_lib.CONFIG_JSON_NAME
    if not path.is_file():
        logger.warning(
            "%s has checkpoints but no %s; resuming without a config check.",
            logdir,
            config_lib.CONFIG_JSON_NAME,
        )
        return
    try:
        saved = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(
            f"{path} is not valid JSON ({e}); restore it or use a new --logdir."
        ) from e
    saved_train = config_lib.with_train_defaults(saved.get("train", {}))
    diffs = config_lib.resume_mismatches(
        saved_train, record["train"], config_lib.RESUMABLE_CHANGES
    ) + config_lib.resume_mismatches(
        saved.get("model", {}), record["model"], config_lib.RESUMABLE_CHANGES
    )
    if diffs:
        listed = "; ".join(f"--{k}: saved {a!r}, received {b!r}" for k, a, b in diffs)
        raise ConfigError(
            f"--logdir={logdir} holds a run with another config ({listed}); resume it with "
            f"--flagfile={logdir / config_lib.FLAGS_TXT_NAME}, or train in a new --logdir."
        )
    changed = config_lib.resume_mismatches(saved_train, record["train"])
    for key, old, new in changed:
        logger.info("resume: --%s changed from %r to %r", key, old, new)
