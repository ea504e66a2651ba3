"""Validated training configuration (no flags here).

`python -m delg_tf.train` (``delg_tf/train.py``) turns its absl flags into a
`TrainConfig` once; the trainer (`delg_tf.training.trainer.train`) only ever sees
the dataclass. Defaults are the DELG paper's training setup (Cao, Araujo, Sim,
ECCV 2020, Sec. 4.1 "Training details"): batch 16, 512x512 crops, SGD with
momentum 0.9 and a learning rate decaying linearly to zero at `max_iters`
(1.5M steps), an 80/20 train/val split of the landmark training set.

This module does not import TensorFlow.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

from delg_tf.configs import (
    MODEL_FAMILIES,
    ConfigError,
    expect,
    expect_choice,
    expect_int,
    is_finite,
    is_int,
)

DATA_SOURCES = ("gldv2", "embedded", "cub")
OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("linear", "cosine", "constant")
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
EMBEDDED_PRESETS = ("default", "tiny", "eval")  # delg_tf.data.embedded.PRESETS

# Paper Sec. 4.1.
PAPER_BATCH_SIZE = 16
PAPER_IMAGE_SIZE = 512
PAPER_MAX_ITERS = 1_500_000
PAPER_MOMENTUM = 0.9
PAPER_INITIAL_LR = 0.01  # The paper searched [3e-4, 1e-2].

DEFAULT_CHECKPOINT_INTERVAL = 5000
DEFAULT_MAX_CHECKPOINTS_TO_KEEP = 5
DEFAULT_SUMMARY_INTERVAL = 100
DEFAULT_LOG_INTERVAL = 100
DEFAULT_VALIDATION_INTERVAL = 5000
DEFAULT_VALIDATION_STEPS = 100
DEFAULT_ADAMW_BETA_1 = 0.9
DEFAULT_ADAMW_BETA_2 = 0.999

CONFIG_JSON_NAME = "config.json"
FLAGS_TXT_NAME = "flags.txt"
CONFIG_FORMAT_VERSION = 1

# Fields that may differ between a run and the run it resumes: they change
# bookkeeping, where the data is read from, or how long training lasts, but not
# what the checkpoint means. Every other field must match (see
# `resume_mismatches`).
RESUMABLE_CHANGES = frozenset(
    {
        "logdir",
        "max_iters",
        "checkpoint_interval",
        "max_checkpoints_to_keep",
        "summary_interval",
        "log_interval",
        "validation_interval",
        "validation_steps",
        "train_file_pattern",
        "validation_file_pattern",
        "data_dir",
        "strategy",
        "tpu",
        "init_from",
        "imagenet_weights",
        "save_iterator_state",
        "num_parallel_reads",
        "deterministic",
        "intra_op_threads",
    }
)
# Intra-op threads of a --deterministic run that sets none: oneDNN and Eigen split a
# reduction by thread count, so the count must be the same on every machine.
DETERMINISTIC_INTRA_OP_THREADS = 2


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything the trainer needs besides the model's own config.

    Each attribute is the flag of the same name of `python -m delg_tf.train`.

    Attributes:
        logdir: output folder: checkpoints, `config.json`, `flags.txt`, TensorBoard
            events (`train/`, `validation/`). Rerunning with the same folder resumes.
        model_family: "delg" (Cao et al. 2020) or "glocal" (Kim et al. 2023).
        data_source: "gldv2" (TFRecords of the official DELF format), "embedded"
            (the photos shipped with scikit-image, built under `data_dir`), "cub"
            (CUB-200-2011 folder in `data_dir`).
        train_file_pattern: glob of the training TFRecords ("gldv2" source).
        validation_file_pattern: glob of the validation TFRecords (the 20% split);
            empty/None disables validation for "gldv2".
        data_dir: "embedded": cache folder for the built dataset and its TFRecords
            (default `<logdir>/data`); "cub": the CUB_200_2011 folder (checked
            when the data is read, with what to download if it is missing).
        embedded_preset: size preset of the embedded dataset ("default", "tiny", "eval").
        embedded_train_landmarks: "embedded" source, DELG: train on the landmarks with
            id < this only (0 = all), so the others stay unseen for evaluation (the
            paper trains on GLDv2 and tests on other landmarks; `configs/demo.flags`
            and `delg_tf.demo`). Glocal has its own split (first half of the landmarks).
        num_classes: number of training classes; None = read from the data.
        max_iters: number of training steps; training ends there.
        batch_size: global batch size (split over replicas).
        image_size: side of the square training crops, in pixels.
        augment: random crop / aspect-ratio distortion before resizing.
        initial_lr: learning rate at step 0 (after warmup).
        optimizer: "sgd" (paper: with momentum) or "adamw".
        momentum: SGD momentum.
        weight_decay: decoupled weight decay (both optimizers); 0 disables it.
        lr_schedule: "linear" (paper: linear decay to 0 at max_iters), "cosine"
            (cosine decay to 0 at max_iters) or "constant".
        warmup_steps: linear warmup from 0 over this many steps, then the schedule.
        checkpoint_interval: save a checkpoint every N steps (and at the end).
        max_checkpoints_to_keep: checkpoints kept by the CheckpointManager.
        summary_interval: write TensorBoard scalars every N steps.
        log_interval: print a progress line every N steps.
        validation_interval: validate every N steps (0 disables validation).
        validation_steps: batches per validation.
        seed: random seed (weights init, data order, augmentation).
        strategy: tf.distribute strategy: "default", "mirrored" (all local GPUs,
            or all logical CPU devices when there is no GPU), "multi_worker"
            (TF_CONFIG), "tpu".
        tpu: TPU name/address for the "tpu" strategy ("" = local).
        init_from: a delg_tf checkpoint (folder or prefix) whose model weights
            initialise a new run (fine-tuning; optimizer state is not taken).
        imagenet_weights: "imagenet", a weights file, or None (random init).
        save_iterator_state: also checkpoint the tf.data iterator position
            (possible with the "default" strategy only; otherwise the data order
            is reseeded from the resumed step).
        num_parallel_reads: TFRecord files read in parallel.
        deterministic: TF op determinism (``tf.config.experimental.enable_op_determinism``)
            and a fixed intra-op thread count (``intra_op_threads``, else 2): two runs with
            the same config on one machine give identical weights. Machines with other CPU
            generations still differ (oneDNN picks other floating-point kernels per
            instruction set).
        intra_op_threads: threads one TF op may use (0 = TF's default: every core;
            with ``deterministic``, 2). Must be set
            before TensorFlow starts running ops.
    """

    logdir: str
    model_family: str = "delg"
    data_source: str = "gldv2"
    train_file_pattern: Optional[str] = None
    validation_file_pattern: Optional[str] = None
    data_dir: Optional[str] = None
    embedded_preset: str = "default"
    embedded_train_landmarks: int = 0
    num_classes: Optional[int] = None
    max_iters: int = PAPER_MAX_ITERS
    batch_size: int = PAPER_BATCH_SIZE
    image_size: int = PAPER_IMAGE_SIZE
    augment: bool = True
    initial_lr: float = PAPER_INITIAL_LR
    optimizer: str = "sgd"
    momentum: float = PAPER_MOMENTUM
    weight_decay: float = 0.0
    lr_schedule: str = "linear"
    warmup_steps: int = 0
    checkpoint_interval: int = DEFAULT_CHECKPOINT_INTERVAL
    max_checkpoints_to_keep: int = DEFAULT_MAX_CHECKPOINTS_TO_KEEP
    summary_interval: int = DEFAULT_SUMMARY_INTERVAL
    log_interval: int = DEFAULT_LOG_INTERVAL
    validation_interval: int = DEFAULT_VALIDATION_INTERVAL
    validation_steps: int = DEFAULT_VALIDATION_STEPS
    seed: int = 0
    strategy: str = "default"
    tpu: str = ""
    init_from: Optional[str] = None
    imagenet_weights: Optional[str] = None
    save_iterator_state: bool = True
    num_parallel_reads: int = 4
    deterministic: bool = False
    intra_op_threads: int = 0

    def __post_init__(self):
        self.validate()

    def validate(self) -> "TrainConfig":
        """Checks every field (done at construction); returns self so calls chain.

        Raises:
            ConfigError: naming the flag, the expected and the received value.
        """
        expect(bool(self.logdir), "logdir", "a folder for checkpoints and summaries", self.logdir)
        expect_choice("model_family", self.model_family, MODEL_FAMILIES)
        expect_choice("data_source", self.data_source, DATA_SOURCES)
        expect_choice("optimizer", self.optimizer, OPTIMIZERS)
        expect_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        expect_choice("strategy", self.strategy, STRATEGIES)
        expect_choice("embedded_preset", self.embedded_preset, EMBEDDED_PRESETS)
        for name in (
            "max_iters",
            "batch_size",
            "image_size",
            "checkpoint_interval",
            "max_checkpoints_to_keep",
            "summary_interval",
            "log_interval",
            "validation_steps",
            "num_parallel_reads",
        ):
            expect_int(name, getattr(self, name), 1)
        for name in (
            "validation_interval",
            "warmup_steps",
            "seed",
            "embedded_train_landmarks",
            "intra_op_threads",
        ):
            expect_int(name, getattr(self, name), 0)
        expect(
            self.warmup_steps < self.max_iters,
            "warmup_steps",
            f"fewer steps than --max_iters={self.max_iters}",
            self.warmup_steps,
        )
        expect(
            self.num_classes is None or (is_int(self.num_classes) and self.num_classes >= 2),
            "num_classes",
            "an integer >= 2, or unset to read it from the data",
            self.num_classes,
        )
        expect(
            is_finite(self.initial_lr) and self.initial_lr > 0,
            "initial_lr",
            "a float > 0 (paper: within [3e-4, 1e-2])",
            self.initial_lr,
        )
        expect(
            is_finite(self.momentum) and 0 <= self.momentum < 1,
            "momentum",
            "a float in [0, 1)",
            self.momentum,
        )
        expect(
            is_finite(self.weight_decay) and self.weight_decay >= 0,
            "weight_decay",
            "a float >= 0",
            self.weight_decay,
        )
        if self.data_source == "gldv2":
            expect(
                bool(self.train_file_pattern),
                "train_file_pattern",
                "a glob of GLDv2 training TFRecords, e.g. "
                "--train_file_pattern=/data/gldv2/tfrecord/train-* (build them with "
                "python -m delg_tf.data.build_tfrecords)",
                self.train_file_pattern,
            )
        if self.embedded_train_landmarks:
            expect(
                self.data_source == "embedded" and self.model_family == "delg",
                "embedded_train_landmarks",
                "0 unless --data_source=embedded --model_family=delg (Glocal has its own "
                "split of the embedded landmarks; other sources have their own data)",
                self.embedded_train_landmarks,
            )
        if self.strategy != "tpu":
            expect(not self.tpu, "tpu", "empty unless --strategy=tpu", self.tpu)
        return self

    @property
    def resolved_intra_op_threads(self) -> int:
        """Intra-op threads to set (0 = leave TF's default)."""
        if self.intra_op_threads or not self.deterministic:
            return self.intra_op_threads
        return DETERMINISTIC_INTRA_OP_THREADS

    @property
    def resolved_data_dir(self) -> Path:
        """`data_dir`, or `<logdir>/data` when unset."""
        return Path(self.data_dir) if self.data_dir else Path(self.logdir) / "data"

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict of the fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Inverse of `to_dict`; unknown keys raise ConfigError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(
                f"unknown training config keys {unknown}; expected a subset of {sorted(names)}."
            )
        return cls(**values)


def with_train_defaults(saved_train: dict) -> dict:
    """A saved `TrainConfig` dict with the fields added since it was written at their
    defaults (the behaviour of the run that wrote it).
    """
    defaults = {
        f.name: f.default
        for f in dataclasses.fields(TrainConfig)
        if f.default is not dataclasses.MISSING
    }
    return {**defaults, **saved_train}


def resume_mismatches(saved: dict, current: dict, allowed=frozenset()) -> list:
    """Keys whose values differ between two flat config dicts, except `allowed`.

    Returns:
        Sorted list of (key, saved value, current value).
    """
    keys = sorted((set(saved) | set(current)) - set(allowed))
    return [
        (k, saved.get(k), current.get(k))
        for k in keys
        if _normalise(saved.get(k)) != _normalise(current.get(k))
    ]


def _normalise(value):
    # JSON turns tuples into lists; compare them alike.
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value


def config_record(config: TrainConfig, model_config) -> dict:
    """The JSON document saved as `<logdir>/config.json`."""
    return {
        "format_version": CONFIG_FORMAT_VERSION,
        "train": config.to_dict(),
        "model": model_config_to_dict(model_config),
    }


def model_config_to_dict(model_config) -> dict:
    """A model config (dataclass or object with get_config/to_dict) as a dict."""
    if model_config is None:
        return {}
    if dataclasses.is_dataclass(model_config):
        return json.loads(json.dumps(dataclasses.asdict(model_config), default=str))
    for method in ("to_dict", "get_config"):
        if hasattr(model_config, method):
            return json.loads(json.dumps(getattr(model_config, method)(), default=str))
    raise ConfigError(
        f"cannot serialise the model config {type(model_config).__name__}: "
        "expected a dataclass or an object with to_dict()/get_config()."
    )


def format_flag(name, value) -> Optional[str]:
    """One `--name=value` flagfile line (None for unset values)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no{name}"
    if isinstance(value, (list, tuple)):
        return f"--{name}=" + ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return f"--{name}=" + json.dumps(value, sort_keys=True)
    return f"--{name}={value}"


def flags_text(record: dict) -> str:
    """A re-runnable flagfile for a `config_record` (train + model flags)."""
    lines = ["# Resolved flags of this run: python -m delg_tf.train --flagfile=<this file>"]
    seen = set()
    for section in ("train", "model"):
        for name, value in record.get(section, {}).items():
            if name in seen:
                continue
            seen.add(name)
            line = format_flag(name, value)
            if line is not None:
                lines.append(line)
    return "\n".join(lines) + "\n"
