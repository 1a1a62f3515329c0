"""The linear classification protocol of MoCo (main_lincls.py): a linear classifier on a frozen encoder.

The official protocol, and the defaults here: the backbone is frozen and always runs in inference
mode (BatchNorm uses, and never updates, its moving statistics); a fresh Dense classifier,
weights N(0, 0.01) and zero bias, is trained by SGD (PyTorch semantics) with lr 30 (at batch 256), momentum
0.9, weight decay 0, batch 256, for 100 epochs, the rate x0.1 at epochs 60 and 80; training
images get RandomResizedCrop + flip, validation images resize (256/224 of the crop) + centre
crop. Top-1 and top-5 on the val split after every epoch. The classifier, optimizer and epoch
are checkpointed in --model_dir each epoch, and a rerun resumes. At the end the backbone is
loaded again from PATH and compared variable by variable with the one that was used: the
official sanity check that the frozen weights (BN statistics included) did not move.

--precompute_features trains on features extracted once, without augmentation: much faster on
a CPU, but not the official protocol (no random crops), so its numbers are labelled as such.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from moco_tf import outputs, reporting
from moco_tf.data.pipelines import pass_seed
from moco_tf.evaluation.frozen import FrozenBackbone
from moco_tf.evaluation.knn import extract_features
from moco_tf.training.checkpoint_files import newest_intact, restore_matching
from moco_tf.training.optimizers import SGD
from moco_tf.training.schedules import EpochSchedule

CONFIG_FILE = "lincls_config.json"
RESULTS_FILE = "lincls_results.json"


class BackboneChangedError(RuntimeError):
    """The frozen backbone differs from the pretrained one after training: a bug, never expected."""


class LinearClassifier(keras.Model):
    """images -> frozen backbone (inference mode) -> Dense logits; or features -> logits when
    `backbone` is None (precomputed features). Only `fc` is trainable: the backbone is a plain
    attribute holder, not a tracked layer, so no optimizer or checkpoint ever sees it."""

    def __init__(self, backbone: FrozenBackbone | None, num_classes: int, **kwargs):
        # float32 whatever the global policy: under mixed precision only the frozen backbone computes
        # in float16 / bfloat16 (no loss scaling needed, no fp16 logits).
        super().__init__(dtype="float32", **kwargs)
        self.backbone = backbone  # not a Layer: Keras tracks none of its variables
        self.fc = keras.layers.Dense(
            num_classes,
            kernel_initializer=keras.initializers.RandomNormal(0.0, 0.01),  # main_lincls.py
            bias_initializer="zeros",
            dtype="float32",
            name="fc",
        )

    def call(self, inputs):
        features = inputs if self.backbone is None else self.backbone(inputs)
        return self.fc(tf.cast(features, tf.float32))

    # A local (inputs, labels) batch whose shapes stand for the data's in Keras's symbolic build.
    shape_sample: tuple[tf.Tensor, tf.Tensor] | None = None

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras (3.x) learns the batch shapes by reducing a distributed batch across replicas, and
        # MultiWorkerMirroredStrategy cannot reduce an (inputs, labels) tuple ("Attempt to convert
        # a value (PerReplica...)"): fit/evaluate failed on every multi-worker run. A local sample
        # has the same shapes.
        if data_batch is None and self.shape_sample is not None:
            iterator, data_batch = None, self.shape_sample
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def train_step(self, data):
        return _reducible(super().train_step(data))

    def test_step(self, data):
        return _reducible(super().test_step(data))


def _reducible(logs: dict) -> dict:
    """Keras reduces multi-worker logs with a mean along axis 0, which a scalar lacks (as MoCo's step)."""
    if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
        return {name: tf.reshape(value, [1]) for name, value in logs.items()}
    return logs


@contextlib.contextmanager
def _finite_datasets():
    """Datasets of unknown length (ignore_errors) end each pass by running out: Keras learns the
    length then and warns that the input "ran out of data", which here is expected, not a problem."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        yield


def make_optimizer(
    lr: float, momentum: float, weight_decay: float, steps_per_epoch: int, epochs: int, milestones: Sequence[int]
) -> SGD:
    """PyTorch SGD with the official step schedule (lr x0.1 at each milestone epoch)."""
    schedule = EpochSchedule(lr, steps_per_epoch, epochs, schedule="step", milestones=tuple(milestones))
    return SGD(schedule, momentum=momentum, weight_decay=weight_decay)


class _Checkpointer(keras.callbacks.Callback):
    """Saves classifier + optimizer + epoch after every epoch; appends the epoch's numbers."""

    def __init__(self, manager: tf.train.CheckpointManager | None, epoch: tf.Variable, results: list, log, epochs: int):
        super().__init__()
        self.manager, self.epoch, self.results, self.log, self.epochs = manager, epoch, results, log, epochs
        self.lr = None

    def on_epoch_begin(self, epoch, logs=None):
        self.lr = float(self.model.optimizer.learning_rate)  # this epoch's rate (the schedule's at its first step)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        row = {
            "epoch": epoch + 1,
            "lr": self.lr,
            "loss": float(logs.get("loss", float("nan"))),
            "train_top1": 100.0 * float(logs.get("top1", float("nan"))),
            "val_top1": 100.0 * float(logs.get("val_top1", float("nan"))),
            "val_top5": 100.0 * float(logs.get("val_top5", float("nan"))),
        }
        self.results.append(row)
        self.epoch.assign(epoch + 1)
        if self.manager is not None:
            self.manager.save(checkpoint_number=epoch + 1)
            write_json(os.path.join(self.manager.directory, RESULTS_FILE), self.results)
        self.log(
            f"epoch {epoch + 1}/{self.epochs}  lr {row['lr']:.4g}  loss {row['loss']:.4f}  "
            f"train top-1 {row['train_top1']:.2f}%  val top-1 {row['val_top1']:.2f}%  top-5 {row['val_top5']:.2f}%"
        )


# One pass over the training data: a dataset, or a function of the epoch giving that epoch's pass
# (`labelled_dataset(..., epoch=e)`), whose order and crops then depend on (seed, epoch) alone.
EpochData = tf.data.Dataset | Callable[[int], tf.data.Dataset]


@reporting.shown_unless_configured()
def train_linear(
    backbone: FrozenBackbone | None,
    train_ds: EpochData,
    val_ds: tf.data.Dataset,
    num_classes: int,
    steps_per_epoch: int,
    epochs: int = 100,
    lr: float = 30.0,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    milestones: Sequence[int] = (60, 80),
    model_dir: str | None = None,
    log: Callable[[str], None] | None = None,
    strategy: tf.distribute.Strategy | None = None,
    chief: bool = True,
    seed: int | None = None,
    repair_broken: bool = False,
) -> tuple[LinearClassifier, list[dict]]:
    """Train a linear classifier on `backbone` (None: the datasets hold features); resumes from
    the latest checkpoint in `model_dir`. Returns the classifier and one results row per epoch.

    train_ds / val_ds: finite (inputs, labels) batches; train_ds is iterated once per epoch, or
        is a function epoch -> that epoch's batches: then, with a seed, a run stopped after any
        epoch and resumed ends exactly as an uninterrupted one (`fit_epochs`).
    steps_per_epoch: batches in one pass of train_ds (the schedule counts epochs in steps).
    lr: the rate used, not scaled here (`python -m moco_tf.lincls` scales its per-256 --lr by the batch size).
    strategy: the classifier and its optimizer are made in its scope, and `fit` splits every
        (global) batch over its replicas and workers; `chief`: whether this process writes files.
    seed: of the classifier's initialisation (None: unseeded), so a run with a seed repeats.
    log: where the epoch lines and notices go; default an INFO record of this module's logger
        (shown on stdout for the call where logging is not configured: moco_tf.reporting).
    repair_broken: a broken newest checkpoint (named through `log`, the previous one used) is
        moved into model_dir/broken/; only for a model_dir proven to be this command's own
        (`moco_tf.cli.evaluation.is_own_model_dir`, checked before the run writes its config). Otherwise it stays.
    """
    log = log or logging.getLogger(__name__).info
    strategy = strategy or tf.distribute.get_strategy()
    inputs, labels = next(iter(val_ds.take(1)))
    if seed is not None:
        keras.utils.set_random_seed(seed)
    with strategy.scope():
        model = LinearClassifier(backbone, num_classes)
        model(inputs[:1])  # builds fc
        model.shape_sample = (inputs[:1], labels[:1])
        optimizer = make_optimizer(lr, momentum, weight_decay, steps_per_epoch, epochs, milestones)
        optimizer.build(model.trainable_variables)  # before a restore, so every slot has its value
        epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    manager, results = None, []
    if model_dir:
        checkpoint = tf.train.Checkpoint(fc=model.fc, optimizer=optimizer, epoch=epoch)
        manager, latest = resume(checkpoint, model_dir, repair_broken, log)
        if latest:
            results = read_results_file(os.path.join(model_dir, RESULTS_FILE))[: int(epoch.numpy())]
            log(f"resuming from {latest} (epoch {int(epoch.numpy())} of {epochs} done)")
    compile_classifier(model, optimizer, num_classes, strategy)
    callback = _Checkpointer(manager if chief else None, epoch, results, log, epochs)
    fit_epochs(model, train_ds, steps_per_epoch, int(epoch.numpy()), epochs, val_ds, range(1, epochs + 1), [callback])
    return model, results


def fit_epochs(
    model: keras.Model,
    train_ds: EpochData,
    steps_per_epoch: int,
    done: int,
    epochs: int,
    val_ds: tf.data.Dataset | None,
    val_epochs: Sequence[int],
    callbacks: list,
) -> None:
    """`model.fit` over epochs done+1 .. epochs, one epoch per call: each epoch's pass is built
    anew from train_ds(epoch) (a dataset is used as it is), so a resumed run trains on the very
    passes an uninterrupted one would, rather than starting the data's sequence over. The train
    step is traced once (the passes share one element spec). Validates after the epochs listed."""
    for e in range(done, epochs):
        data = train_ds(e) if callable(train_ds) else train_ds
        with _finite_datasets():
            model.fit(
                exact_epochs(data, steps_per_epoch),
                epochs=e + 1,
                initial_epoch=e,
                validation_data=val_ds if e + 1 in val_epochs else None,
                callbacks=callbacks,
                shuffle=False,  # the dataset shuffles itself each epoch
                verbose=0,
            )


def compile_classifier(
    model: keras.Model, optimizer: keras.optimizers.Optimizer, num_classes: int, strategy: tf.distribute.Strategy
) -> None:
    """Cross-entropy on logits, top-1 and top-5 (top-k for fewer classes): what the linear protocol
    and fine-tuning report."""
    with strategy.scope():
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[
                keras.metrics.SparseCategoricalAccuracy(name="top1"),
                keras.metrics.SparseTopKCategoricalAccuracy(k=min(5, num_classes), name="top5"),
            ],
        )


def exact_epochs(train_ds: tf.data.Dataset, steps_per_epoch: int) -> tf.data.Dataset:
    """Exactly steps_per_epoch batches an epoch, and Keras told so: on a dataset of unknown length
    (image files read with ignore_errors) Keras 3 counted one optimizer iteration more per epoch
    than there were batches, running a per-step schedule ahead of the epochs (3 a pass of 2)."""
    return train_ds.repeat().take(steps_per_epoch).apply(tf.data.experimental.assert_cardinality(steps_per_epoch))


def evaluate(model: LinearClassifier, val_ds: tf.data.Dataset) -> dict[str, float]:
    """Top-1 / top-5 (percent) of the classifier on `val_ds`."""
    with _finite_datasets():
        logs = model.evaluate(val_ds, verbose=0, return_dict=True)
    return {"top1": 100.0 * logs["top1"], "top5": 100.0 * logs["top5"]}


def sanity_check(backbone: FrozenBackbone, reference: FrozenBackbone, pretrained: str) -> int:
    """Compare every backbone variable (BN statistics included) with `reference`, the same
    pretrained encoder loaded again from `pretrained` (its PATH, named in the message); returns
    how many were compared, raises BackboneChangedError if any moved."""
    used, expected = backbone.model.weights, reference.model.weights
    if len(used) != len(expected):
        raise BackboneChangedError(f"the backbone has {len(used)} variables, {pretrained} has {len(expected)}")
    changed = [
        w.path
        for w, r in zip(used, expected, strict=True)
        if w.shape != r.shape or not np.array_equal(np.asarray(w), np.asarray(r))
    ]
    if changed:
        raise BackboneChangedError(
            f"sanity check FAILED: {len(changed)} backbone variable(s) differ from {pretrained}: "
            + ", ".join(changed[:10])
            + (" ..." if len(changed) > 10 else "")
        )
    return len(used)


def feature_dataset(
    backbone: FrozenBackbone,
    ds: tf.data.Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int | None = None,
    strategy: tf.distribute.Strategy | None = None,
    per_epoch: bool = False,
) -> tuple[EpochData, int]:
    """Precompute features of `ds` once (over `strategy`'s replicas, see `extract_features`);
    (batched (features, labels) dataset, number of examples). per_epoch: instead of the dataset,
    the function epoch -> that epoch's pass (`batched_features`), for an exact resume."""
    features, labels = extract_features(backbone, ds, strategy=strategy)
    if per_epoch:
        return functools.partial(batched_features, features, labels, batch_size, shuffle, seed), len(labels)
    return batched_features(features, labels, batch_size, shuffle, seed), len(labels)


def batched_features(
    features: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    shuffle: bool,
    seed: int | None = None,
    epoch: int = 0,
) -> tf.data.Dataset:
    """Features already extracted as a batched (features, labels) dataset, reshuffled each epoch if
    asked; `epoch`: which pass, its order seeded by (seed, epoch) (a function of the epoch for
    `train_linear` is `functools.partial(batched_features, features, labels, batch, True, seed)`)."""
    out = tf.data.Dataset.from_tensor_slices((features, np.asarray(labels).astype(np.int32)))
    if shuffle:
        out = out.shuffle(len(labels), seed=pass_seed(seed, epoch), reshuffle_each_iteration=True)
    return out.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def write_json(path: str, value: Any) -> None:
    """`value` as indented JSON at `path` (any tf.io.gfile path, e.g. gs://), atomically and marked
    `"format": "moco_tf.<file name>"` (`moco_tf.outputs`), so a kill leaves the old or the new file."""
    outputs.write_json(path, value, results_kind(path))


def results_kind(path: str) -> str:
    """The format marker of a results file: its name without .json (lincls_results, finetune_final)."""
    return os.path.splitext(os.path.basename(path))[0]


def _per_epoch_rows(value: Any) -> bool:
    """Rows as write_json wrote them: objects, each with its epoch (a positive integer)."""
    return isinstance(value, list) and all(
        isinstance(row, dict) and type(row.get("epoch")) is int and row["epoch"] >= 1 for row in value
    )


def read_results_file(path: str) -> list[dict[str, Any]]:
    """The per-epoch rows of a results file (none when it is absent); a garbled file or another
    program's is a one-line OutputError naming it, never read as rows nor overwritten."""
    if not tf.io.gfile.exists(path):
        return []
    rows = outputs.read_json(path, results_kind(path))
    if not _per_epoch_rows(rows):
        raise outputs.OutputError(f"{path} does not hold per-epoch results; restore or remove it")
    return rows


def resume(
    checkpoint: tf.train.Checkpoint, ckpt_dir: str, repair_broken: bool, log: Callable[[str], None]
) -> tuple[tf.train.CheckpointManager, str | None]:
    """(manager, prefix restored or None) for an evaluation run's checkpoints in ckpt_dir, as train
    resumes (`training.checkpoint.newest_intact`): the newest checkpoint that reads through is
    restored; a broken newer one is named through `log`, and with `repair_broken` moved into
    ckpt_dir/broken/. Checkpoint files none of which reads raise CheckpointError (one line)."""
    latest = newest_intact(ckpt_dir, log=log, repair=repair_broken)
    # Made after the repair: the manager reads the `checkpoint` record, now listing intact ones only.
    manager = tf.train.CheckpointManager(checkpoint, ckpt_dir, max_to_keep=2)
    if latest:
        restore_matching(checkpoint, latest, "this run's classifier and optimizer; use a new --model_dir")
    return manager, latest
