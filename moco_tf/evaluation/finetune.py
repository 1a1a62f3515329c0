"""Fine-tuning: the whole backbone and a new linear head trained on (a fraction of) the labels.

The recipe (defaults here and in configs/*finetune*.flags) is the semi-supervised fine-tuning of
SimCLR v1 (Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations",
ICML 2020, arXiv:2002.05709, appendix B.5): SGD with Nesterov momentum 0.9, lr 0.05 x batch/256
(0.8 at their batch 4096), no warm-up, no weight decay or other regularisation, training images
RandomResizedCrop + horizontal flip only, evaluation resize + one centre crop (256 -> 224 on
ImageNet); 60 epochs with 1% of the labels, 30 with 10%. The paper does not state a schedule;
its code (google-research/simclr) decays the rate by a cosine, which is used here (set per
epoch, as moco_tf's other schedules). The head is main_lincls.py's: Dense, N(0, 0.01) weights,
zero bias. BatchNorm runs in training mode in `fit` (batch statistics, moving statistics
updated) and in inference mode for evaluation.

Top-1 / top-5 on the eval split every `eval_every` epochs and at the end; backbone, head,
optimizer and epoch are checkpointed in model_dir after every epoch, and a rerun resumes
(from the last finished epoch; given each epoch's pass as a function of the epoch, as the
command line does, it trains on the very data an uninterrupted run would: exact with a seed).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from moco_tf import reporting
from moco_tf.evaluation.linear import (
    EpochData,
    _finite_datasets,
    compile_classifier,
    fit_epochs,
    read_results_file,
    resume,
    write_json,
)
from moco_tf.training.checkpoint_files import CHECKPOINT_DIR
from moco_tf.training.optimizers import SGD
from moco_tf.training.schedules import EpochSchedule

CONFIG_FILE = "finetune_config.json"
RESULTS_FILE = "finetune_results.json"
FINAL_FILE = "finetune_final.json"
# SimCLR v1 appendix B.5: fine-tuning epochs per label fraction. Other fractions need --epochs.
EPOCHS_PER_FRACTION = {0.01: 60, 0.1: 30}
BASE_LR = 0.05  # per 256 images (SimCLR v1 B.5: LearningRate = 0.05 x BatchSize / 256)


def default_epochs(fraction: float) -> int | None:
    """The recipe's epochs for a label fraction (None where the source gives none)."""
    return EPOCHS_PER_FRACTION.get(fraction)


@keras.saving.register_keras_serializable(package="moco_tf")
class NesterovSGD(SGD):
    """`torch.optim.SGD(..., nesterov=True)` (and TF1's MomentumOptimizer(use_nesterov=True), which
    SimCLR used, at a constant rate): buf = m * buf + g; w -= lr * (g + m * buf)."""

    def update_step(self, gradient, variable, learning_rate):
        lr = tf.cast(learning_rate, variable.dtype)
        grad = tf.cast(gradient, variable.dtype)
        if self.coupled_weight_decay:
            grad = grad + tf.cast(self.coupled_weight_decay, variable.dtype) * variable
        momentum = tf.cast(self.momentum, variable.dtype)
        buffer = self.momentum_buffers[self._get_variable_index(variable)]
        new_buffer = momentum * buffer + grad
        self.assign(buffer, new_buffer)
        self.assign_sub(variable, lr * (grad + momentum * new_buffer))


def make_optimizer(
    lr: float, momentum: float, nesterov: bool, weight_decay: float, steps_per_epoch: int, epochs: int
) -> SGD:
    """SGD (Nesterov by default) with `make_schedule`'s rate."""
    schedule = make_schedule(lr, steps_per_epoch, epochs)
    kind = NesterovSGD if nesterov else SGD
    return kind(schedule, momentum=momentum, weight_decay=weight_decay)


def make_schedule(lr: float, steps_per_epoch: int, epochs: int) -> EpochSchedule:
    """The rate decayed by a cosine over `epochs`, set per epoch, no warm-up."""
    return EpochSchedule(lr, steps_per_epoch, epochs, schedule="cosine")


class FineTuneClassifier(keras.Model):
    """images (ImageNet-normalised) -> backbone -> Dense logits; every weight trains.

    `backbone` is a moco_tf ResNet (`BackboneSpec.build()`); `training` reaches its BatchNorm
    layers, so `fit` uses batch statistics and `evaluate` / `predict` the moving ones.
    """

    def __init__(self, backbone: keras.Model, num_classes: int, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self.fc = keras.layers.Dense(
            num_classes,
            kernel_initializer=keras.initializers.RandomNormal(0.0, 0.01),  # main_lincls.py's head
            bias_initializer="zeros",
            dtype="float32",
            name="fc",
        )

    def call(self, inputs, training=None):
        return self.fc(tf.cast(self.backbone(inputs, training=training), tf.float32))


def build_classifier(
    build_backbone: Callable[[], keras.Model],
    num_classes: int,
    weights: list | None = None,
    strategy: tf.distribute.Strategy | None = None,
    sample_shape: tuple[int, int, int] = (32, 32, 3),
) -> FineTuneClassifier:
    """A FineTuneClassifier made in `strategy`'s scope; `weights`: the pretrained backbone's
    (`keras.Model.get_weights()` order), None for random init."""
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        backbone = build_backbone()
        if weights is not None:
            backbone.set_weights(weights)
        backbone.trainable = True
        model = FineTuneClassifier(backbone, num_classes)
        model(tf.zeros((1, *sample_shape)), training=False)  # builds fc
    return model


class _EpochEnd(keras.callbacks.Callback):
    """Saves everything after every epoch, appends the epoch's numbers, prints one line."""

    def __init__(self, manager, epoch: tf.Variable, results: list, log, model_dir: str | None, epochs: int):
        super().__init__()
        self.manager, self.epoch, self.results, self.log, self.model_dir = manager, epoch, results, log, model_dir
        self.epochs, self.lr = epochs, None

    def on_epoch_begin(self, epoch, logs=None):
        self.lr = float(self.model.optimizer.learning_rate)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        row = {
            "epoch": epoch + 1,
            "lr": self.lr,
            "loss": float(logs.get("loss", float("nan"))),
            "train_top1": 100.0 * float(logs.get("top1", float("nan"))),
        }
        if "val_top1" in logs:
            row.update(val_top1=100.0 * float(logs["val_top1"]), val_top5=100.0 * float(logs["val_top5"]))
        self.results.append(row)
        self.epoch.assign(epoch + 1)
        if self.manager is not None:
            self.manager.save(checkpoint_number=epoch + 1)
            write_json(os.path.join(self.model_dir, RESULTS_FILE), self.results)
        val = f"  val top-1 {row['val_top1']:.2f}%  top-5 {row['val_top5']:.2f}%" if "val_top1" in row else ""
        self.log(
            f"epoch {epoch + 1}/{self.epochs}  lr {row['lr']:.4g}  loss {row['loss']:.4f}  "
            f"train top-1 {row['train_top1']:.2f}%{val}"
        )


@reporting.shown_unless_configured()
def finetune(
    model: FineTuneClassifier,
    train_ds: EpochData,
    val_ds: tf.data.Dataset,
    steps_per_epoch: int,
    epochs: int,
    lr: float,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 0.0,
    model_dir: str | None = None,
    eval_every: int = 1,
    log: Callable[[str], None] | None = None,
    strategy: tf.distribute.Strategy | None = None,
    chief: bool = True,
    tensorboard: bool = True,
    repair_broken: bool = False,
) -> list[dict]:
    """Train every weight of `model` (see the module docstring); resumes from the newest
    checkpoint in `model_dir`. Returns one results row per epoch done (this run's and the
    resumed ones').

    train_ds / val_ds: finite (images, labels) batches; train_ds is one epoch, or a function
        epoch -> that epoch's batches (exact resume with a seed: see `linear.fit_epochs`).
    steps_per_epoch: batches in one pass of train_ds (the schedule counts epochs in steps).
    lr: the rate used (not scaled here; the command line scales its per-256 --lr).
    eval_every: top-1/top-5 on val_ds every N epochs and after the last; 0: never (call `evaluate`).
    strategy: the model must have been made in its scope (`build_classifier`); `chief`: whether
        this process writes files. tensorboard: epoch scalars in model_dir/logs.
    log: where the epoch lines and notices go; default an INFO record of this module's logger
        (shown on stdout for the call where logging is not configured: moco_tf.reporting).
    repair_broken: move a broken newest checkpoint into model_dir/checkpoints/broken/ (it is
        always named and skipped); only for a model_dir proven to be this command's own
        (`moco_tf.cli.evaluation.is_own_model_dir`).
    """
    log = log or logging.getLogger(__name__).info
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        optimizer = make_optimizer(lr, momentum, nesterov, weight_decay, steps_per_epoch, epochs)
        optimizer.build(model.trainable_variables)  # before a restore, so every slot has its value
        epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    manager, results = None, []
    if model_dir:
        checkpoint = tf.train.Checkpoint(backbone=model.backbone, fc=model.fc, optimizer=optimizer, epoch=epoch)
        manager, latest = resume(checkpoint, os.path.join(model_dir, CHECKPOINT_DIR), repair_broken, log)
        if latest:
            results = read_results(model_dir)[: int(epoch.numpy())]
            log(f"resuming from {latest} (epoch {int(epoch.numpy())} of {epochs} done)")
    compile_classifier(model, optimizer, int(model.fc.units), strategy)
    done = int(epoch.numpy())
    if done < epochs:
        callbacks: list = [_EpochEnd(manager if chief else None, epoch, results, log, model_dir, epochs)]
        if tensorboard and model_dir and chief:
            callbacks.append(
                keras.callbacks.TensorBoard(os.path.join(model_dir, "logs"), write_graph=False, profile_batch=0)
            )
        # Validate on epochs eval_every, 2 x eval_every, ... and on the last one (0: never).
        val_epochs = sorted({e for e in range(eval_every, epochs + 1, eval_every)} | {epochs}) if eval_every else []
        fit_epochs(model, train_ds, steps_per_epoch, done, epochs, val_ds, val_epochs, callbacks)
    return results


def evaluate(model: FineTuneClassifier, val_ds: tf.data.Dataset) -> dict[str, float]:
    """Top-1 / top-5 (percent) on `val_ds`, BatchNorm in inference mode."""
    with _finite_datasets():
        logs = model.evaluate(val_ds, verbose=0, return_dict=True)
    return {"top1": 100.0 * logs["top1"], "top5": 100.0 * logs["top5"]}


def read_results(model_dir: str) -> list[dict[str, Any]]:
    """model_dir's results rows ([] when none); a garbled file is one line naming it."""
    return read_results_file(os.path.join(model_dir, RESULTS_FILE))
