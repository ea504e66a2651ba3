r"""``python -m delg_tf.train``: train DELG (or the Glocal Retriever) from absl flags.

Paper setup (Cao, Araujo, Sim, ECCV 2020, Sec. 4.1) on GLDv2 TFRecords::

    python -m delg_tf.train --flagfile=configs/r50.flags \\
        --train_file_pattern=/data/gldv2/tfrecord/train-* \\
        --validation_file_pattern=/data/gldv2/tfrecord/validation-* \\
        --logdir=/data/runs/delg_r50

Demo on the embedded photos (a few minutes on a CPU)::

    python -m delg_tf.train --flagfile=configs/demo.flags

Rerunning with the same ``--logdir`` resumes from its last checkpoint (SIGTERM or Ctrl-C
first checkpoints the step reached, then exits 143 / 130: see `delg_tf.interrupts`);
``<logdir>/flags.txt`` is a flagfile of the resolved flags of the run.

Flags live only in this module. They come in two groups, turned once into
validated configs by `parse_flags`:

* training flags: one per field of `delg_tf.training.config.TrainConfig`;
* model flags: one per field of each model family's config dataclass
  (`DelgModelConfig`, `GlocalModelConfig`), generated from the dataclasses so
  they never drift. Unset model flags keep the family's defaults.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

# Before TensorFlow is imported: keep its C++ start-up chatter off the console.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

from delg_tf import cli, interrupts  # noqa: E402
from delg_tf.cli import EXIT_USAGE_ERROR  # noqa: E402
from delg_tf.configs import MODEL_FAMILIES, ConfigError  # noqa: E402
from delg_tf.training import config as config_lib  # noqa: E402
from delg_tf.training.config import TrainConfig  # noqa: E402

EXIT_TRAINING_ERROR = 3
# A second Ctrl-C (the first one checkpoints and stops: `interrupts.Interrupted`).
EXIT_INTERRUPTED = interrupts.EXIT_INTERRUPTED
# Placeholder for a model config's required num_classes before the data is read;
# the trainer replaces it with --num_classes or the value read from the data.
UNRESOLVED_NUM_CLASSES = 1
HELP_COMMAND = "python -m delg_tf.train --helpfull"

TRAIN_CHOICES = {
    "model_family": MODEL_FAMILIES,
    "data_source": config_lib.DATA_SOURCES,
    "optimizer": config_lib.OPTIMIZERS,
    "lr_schedule": config_lib.LR_SCHEDULES,
    "strategy": config_lib.STRATEGIES,
    "embedded_preset": config_lib.EMBEDDED_PRESETS,
}


def model_config_classes() -> dict:
    """{family: config dataclass} of the model families that can be imported."""
    from delg_tf.training.trainer import model_config_class

    classes = {}
    for family in MODEL_FAMILIES:
        try:
            classes[family] = model_config_class(family)
        except (ImportError, ValueError):
            continue
    return classes


def define_flags(flag_values=None) -> flags.FlagValues:
    """Defines the training and model flags into `flag_values` (default: a new set)."""
    flag_values = flag_values if flag_values is not None else flags.FlagValues()
    cli.define_config_flags(TrainConfig, flag_values, choices=TRAIN_CHOICES)
    model_flags = {}
    for family, cls in model_config_classes().items():
        docs = cli.attribute_docs(cls)
        for field in dataclasses.fields(cls):
            if field.name in flag_values:
                if field.name in model_flags:
                    model_flags[field.name][1].append((family, field))
                continue
            model_flags[field.name] = (
                cli.field_kind(cls, field),
                [(family, field)],
                docs.get(field.name, field.name),
            )
    for name, (kind, owners, doc) in model_flags.items():
        defaults = [
            f"{family}: {cli.field_default(field)!r}"
            for family, field in owners
            if field.default is not dataclasses.MISSING
            or field.default_factory is not dataclasses.MISSING
        ]
        suffix = "; unset = model default (" + ", ".join(defaults) + ")" if defaults else ""
        families = "/".join(family for family, _ in owners)
        cli.define_flag(flag_values, kind, name, None, f"[model {families}] {doc}{suffix}")
    return flag_values


def _check_family_flags(flag_values, family: str, classes: dict):
    """Model flags given on the command line must belong to the chosen family."""
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    own = {f.name for f in dataclasses.fields(classes[family])}
    for other, cls in classes.items():
        for field in dataclasses.fields(cls):
            name = field.name
            if name in own or name in train_fields or not flag_values[name].present:
                continue
            raise ConfigError(
                f"--{name} is a flag of model family {other}, not of "
                f"--model_family={family}; drop it or change the family."
            )


def _model_config_from_flags(flag_values, family: str, cls):
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name == "num_classes":
            continue
        if field.name in {f.name for f in dataclasses.fields(TrainConfig)}:
            value = getattr(flag_values, field.name)
            if value is not None:
                kwargs[field.name] = value
            continue
        value = cli.flag_to_field(cls, field, getattr(flag_values, field.name))
        if value is not None:
            kwargs[field.name] = value
    num_classes = flag_values.num_classes or UNRESOLVED_NUM_CLASSES
    try:
        model_config = cls(num_classes=num_classes, **kwargs)  # validated at construction.
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"model flags for --model_family={family}: {' '.join(str(e).split())}"
        ) from e
    return model_config


def config_from_flags(flag_values):
    """Turns parsed flags into (validated TrainConfig, validated model config)."""
    train_config = TrainConfig(**cli.config_kwargs(TrainConfig, flag_values))
    classes = model_config_classes()
    if train_config.model_family not in classes:
        raise ConfigError(
            f"--model_family={train_config.model_family} is not available "
            f"(importable families: {sorted(classes)})."
        )
    _check_family_flags(flag_values, train_config.model_family, classes)
    model_config = _model_config_from_flags(
        flag_values, train_config.model_family, classes[train_config.model_family]
    )
    return train_config, model_config


def _check_flagfiles(argv):
    for arg in argv[1:]:
        match = re.match(r"^--?flagfile=(.*)$", arg)
        if match and not os.path.isfile(os.path.expanduser(match.group(1))):
            raise ConfigError(
                f"--flagfile={match.group(1)} does not exist; expected a file "
                "of --name=value lines such as configs/r50.flags."
            )


def _flags_error(error) -> ConfigError:
    message = " ".join(str(error).split())
    return ConfigError(f"{message}; see {HELP_COMMAND}.")


def parse_flags(argv, flag_values=None):
    """Parses a command line (argv[0] = program) into (TrainConfig, model config).

    Uses a fresh flag set unless `flag_values` is given, so it can be called
    repeatedly (tests read every `configs/*.flags` through it).

    Raises:
        ConfigError: unknown flags, missing flagfile, bad values (one line).
    """
    _check_flagfiles(argv)
    flag_values = define_flags(flag_values)
    try:
        extra = flag_values(list(argv))
    except flags.Error as e:
        raise _flags_error(e) from e
    if len(extra) > 1:
        raise ConfigError(
            f"unexpected arguments {extra[1:]}; every setting is a --flag. See {HELP_COMMAND}."
        )
    return config_from_flags(flag_values)


def main(train_config: TrainConfig, model_config) -> Path:
    """Library entry: trains with the given configs; returns the logdir."""
    from delg_tf.training.trainer import train

    return train(train_config, model_config)


def _main_from_flags(flag_values) -> Path:
    logdir = main(*config_from_flags(flag_values))
    print(f"training done: {logdir}")
    return logdir


def _describe_op_error(error) -> str:
    first = (error.message or str(error)).strip().splitlines()[0]
    return (
        f"TensorFlow {type(error).__name__} during training: {first}; the last "
        "checkpoint in --logdir is kept, rerun to resume once fixed."
    )


def _describe_interrupt(error) -> str:
    del error
    return "interrupted; rerun with the same --logdir to resume from the last checkpoint."


def _training_error_rules():
    import tensorflow as tf

    from delg_tf.data.errors import DataError
    from delg_tf.training.trainer import TrainingError

    return [
        cli.ErrorRule((ConfigError, DataError), EXIT_USAGE_ERROR),
        cli.ErrorRule((TrainingError,), EXIT_TRAINING_ERROR),
        cli.ErrorRule((tf.errors.OpError,), EXIT_TRAINING_ERROR, _describe_op_error),
        cli.ErrorRule((KeyboardInterrupt,), EXIT_INTERRUPTED, _describe_interrupt),
    ]


def _parse_into_global_flags(argv):
    _check_flagfiles(argv)
    define_flags(flags.FLAGS)
    return flags.FLAGS(list(argv))


def _parse_or_exit(argv):
    return cli.report_errors(
        _parse_into_global_flags,
        argv,
        expected_errors=[
            cli.ErrorRule((ConfigError,), EXIT_USAGE_ERROR),
            cli.ErrorRule((flags.Error,), EXIT_USAGE_ERROR, _flags_error),
        ],
    )


def run():
    """Console entry point (`delg-train`)."""
    cli.run_main(
        None, _main_from_flags, expected_errors=_training_error_rules, flags_parser=_parse_or_exit
    )


if __name__ == "__main__":
    run()
