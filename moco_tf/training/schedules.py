"""Learning-rate schedules of the official code: set once per epoch, step or cosine."""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
import tensorflow as tf


def scaled_lr(base_lr: float, global_batch_size: int) -> float:
    """Linear scaling: the base rate is per 256 images (MoCo: 0.03 for batch 256)."""
    return base_lr * global_batch_size / 256.0


@keras.saving.register_keras_serializable(package="moco_tf")
class EpochSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """`adjust_learning_rate` of main_moco.py, as a function of the optimizer step.

    - "step": lr * 0.1 for each milestone epoch reached (v1: 120, 160).
    - "cosine": lr * 0.5 * (1 + cos(pi * epoch / epochs)) (v2).
    The rate changes only at epoch boundaries, as the official code does. Optional linear
    warm-up over the first `warmup_epochs` (per step; not in the official recipes).
    """

    def __init__(
        self,
        lr: float,
        steps_per_epoch: int,
        epochs: int,
        schedule: str = "cosine",
        milestones: Sequence[int] = (120, 160),
        warmup_epochs: int = 0,
    ):
        if schedule not in ("cosine", "step"):
            raise ValueError(f"schedule must be 'cosine' or 'step', got {schedule!r}")
        self.lr = float(lr)
        self.steps_per_epoch = int(steps_per_epoch)
        self.epochs = int(epochs)
        self.schedule = schedule
        self.milestones = [int(m) for m in milestones]
        self.warmup_epochs = int(warmup_epochs)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        epoch = tf.floor(step / self.steps_per_epoch)
        if self.schedule == "cosine":
            lr = self.lr * 0.5 * (1.0 + tf.cos(math.pi * epoch / self.epochs))
        else:
            reached = tf.reduce_sum(tf.cast(epoch >= tf.constant(self.milestones or [0], tf.float32), tf.float32))
            lr = self.lr * tf.pow(0.1, reached if self.milestones else 0.0)
        if self.warmup_epochs:
            warmup_steps = float(self.warmup_epochs * self.steps_per_epoch)
            lr = lr * tf.minimum(1.0, (step + 1.0) / warmup_steps)
        return lr

    def get_config(self):
        return dict(
            lr=self.lr,
            steps_per_epoch=self.steps_per_epoch,
            epochs=self.epochs,
            schedule=self.schedule,
            milestones=self.milestones,
            warmup_epochs=self.warmup_epochs,
        )
