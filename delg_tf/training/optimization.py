"""Learning-rate schedule and optimizer of a training run (no training loop here).

DELG (Cao et al. ECCV 2020, Sec. 4.1): SGD with momentum 0.9 and "a linearly
decaying learning rate that reaches zero once the desired number of steps is
reached"; the Glocal Retriever (Kim et al. 2023) trains with AdamW. Used by the
trainer, and by `delg_tf.training.runs` to rebuild a run's optimizer when it
restores a checkpoint that holds the optimizer's state.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from delg_tf.training import config as config_lib
from delg_tf.training.config import TrainConfig


@keras.saving.register_keras_serializable(package="delg_tf")
class WarmupDecaySchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from 0, then linear/cosine decay to 0 at `decay_steps`, or constant.

    DELG (Sec. 4.1): "a linearly decaying learning rate that reaches zero once
    the desired number of steps is reached" = kind "linear", no warmup.

    Args:
        initial_learning_rate: rate reached at the end of warmup.
        decay_steps: step at which the rate reaches 0 (`max_iters`).
        warmup_steps: length of the linear warmup (0 = none).
        kind: "linear", "cosine" or "constant".
    """

    def __init__(self, initial_learning_rate, decay_steps, warmup_steps=0, kind="linear"):
        if kind not in config_lib.LR_SCHEDULES:
            raise ValueError(
                f"schedule kind must be one of {config_lib.LR_SCHEDULES}, received {kind!r}."
            )
        self.initial_learning_rate = float(initial_learning_rate)
        self.decay_steps = int(decay_steps)
        self.warmup_steps = int(warmup_steps)
        self.kind = kind

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        lr = tf.constant(self.initial_learning_rate, tf.float32)
        warmup = float(self.warmup_steps)
        span = max(float(self.decay_steps) - warmup, 1.0)
        progress = tf.clip_by_value((step - warmup) / span, 0.0, 1.0)
        if self.kind == "linear":
            decayed = lr * (1.0 - progress)
        elif self.kind == "cosine":
            decayed = lr * 0.5 * (1.0 + tf.cos(math.pi * progress))
        else:
            decayed = lr
        if self.warmup_steps > 0:
            warm = lr * tf.minimum(step / warmup, 1.0)
            return tf.where(step < warmup, warm, decayed)
        return decayed

    def get_config(self):
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "decay_steps": self.decay_steps,
            "warmup_steps": self.warmup_steps,
            "kind": self.kind,
        }


def make_learning_rate_schedule(config: TrainConfig) -> WarmupDecaySchedule:
    """The schedule named by `config.lr_schedule`, ending at `config.max_iters`."""
    return WarmupDecaySchedule(
        config.initial_lr, config.max_iters, config.warmup_steps, config.lr_schedule
    )


def make_optimizer(config: TrainConfig, schedule=None) -> keras.optimizers.Optimizer:
    """Keras 3 optimizer: SGD with momentum (paper) or AdamW, with optional weight decay."""
    schedule = schedule if schedule is not None else make_learning_rate_schedule(config)
    weight_decay = config.weight_decay or None
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(
            learning_rate=schedule, momentum=config.momentum, weight_decay=weight_decay
        )
    return keras.optimizers.AdamW(
        learning_rate=schedule,
        weight_decay=config.weight_decay,
        beta_1=config_lib.DEFAULT_ADAMW_BETA_1,
        beta_2=config_lib.DEFAULT_ADAMW_BETA_2,
    )
