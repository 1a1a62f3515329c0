"""The linear classification protocol of MoCo (main_lincls.py): a linear classifier on a frozen encoder.

    python -m moco_tf.lincls --flagfile=configs/lincls.flags --pretrained=PATH --model_dir=DIR

The official protocol, and the defaults here: the backbone is frozen and always runs in inference
mode (BatchNorm uses, and never updates, its moving statistics); a fresh Dense classifier,
weights N(0, 0.01) and zero bias, is trained by SGD (PyTorch semantics) with lr 30, momentum
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
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from moco_tf.optimizers import SGD
from moco_tf.pretrained import FrozenBackbone, load_backbone, load_for_evaluation
from moco_tf.schedules import EpochSchedule

CONFIG_FILE = "lincls_config.json"
RESULTS_FILE = "lincls_results.json"
# Settings that must not change between a run and its resumption.
_RESUME_KEYS = ("pretrained", "dataset", "image_size", "precompute_features", "batch_size", "lr", "epochs")


class BackboneChangedError(RuntimeError):
    """The frozen backbone differs from the pretrained one after training: a bug, never expected."""


class LinearClassifier(keras.Model):
    """images -> frozen backbone (inference mode) -> Dense logits; or features -> logits when
    `backbone` is None (precomputed features). Only `fc` is trainable: the backbone is a plain
    attribute holder, not a tracked layer, so no optimizer or checkpoint ever sees it."""

    def __init__(self, backbone: FrozenBackbone | None, num_classes: int, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone  # not a Layer: Keras tracks none of its variables
        self.fc = keras.layers.Dense(
            num_classes,
            kernel_initializer=keras.initializers.RandomNormal(0.0, 0.01),  # main_lincls.py
            bias_initializer="zeros",
            name="fc",
        )

    def call(self, inputs):
        features = inputs if self.backbone is None else self.backbone(inputs)
        return self.fc(features)


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

    def __init__(self, manager: tf.train.CheckpointManager | None, epoch: tf.Variable, results: list, log):
        super().__init__()
        self.manager, self.epoch, self.results, self.log = manager, epoch, results, log
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
            _write_json(os.path.join(self.manager.directory, RESULTS_FILE), self.results)
        self.log(
            f"epoch {epoch + 1}/{self.params['epochs']}  lr {row['lr']:.4g}  loss {row['loss']:.4f}  "
            f"train top-1 {row['train_top1']:.2f}%  val top-1 {row['val_top1']:.2f}%  top-5 {row['val_top5']:.2f}%"
        )


def train_linear(
    backbone: FrozenBackbone | None,
    train_ds: tf.data.Dataset,
    val_ds: tf.data.Dataset,
    num_classes: int,
    steps_per_epoch: int,
    epochs: int = 100,
    lr: float = 30.0,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    milestones: Sequence[int] = (60, 80),
    model_dir: str | None = None,
    log: Callable[[str], None] = print,
) -> tuple[LinearClassifier, list[dict]]:
    """Train a linear classifier on `backbone` (None: the datasets hold features); resumes from
    the latest checkpoint in `model_dir`. Returns the classifier and one results row per epoch.

    train_ds / val_ds: finite (inputs, labels) batches; train_ds is iterated once per epoch.
    steps_per_epoch: batches in one pass of train_ds (the schedule counts epochs in steps).
    """
    model = LinearClassifier(backbone, num_classes)
    sample = next(iter(val_ds.take(1)))[0][:1]
    model(sample)  # builds fc
    optimizer = make_optimizer(lr, momentum, weight_decay, steps_per_epoch, epochs, milestones)
    optimizer.build(model.trainable_variables)  # before a restore, so every slot has its value
    epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    manager, results = None, []
    if model_dir:
        checkpoint = tf.train.Checkpoint(fc=model.fc, optimizer=optimizer, epoch=epoch)
        manager = tf.train.CheckpointManager(checkpoint, model_dir, max_to_keep=2)
        if manager.latest_checkpoint:
            checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
            results = _read_results(model_dir)[: int(epoch.numpy())]
            log(f"resuming from {manager.latest_checkpoint} (epoch {int(epoch.numpy())} of {epochs} done)")
    k = min(5, num_classes)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[
            keras.metrics.SparseCategoricalAccuracy(name="top1"),
            keras.metrics.SparseTopKCategoricalAccuracy(k=k, name="top5"),
        ],
    )
    if int(epoch.numpy()) < epochs:
        with _finite_datasets():
            model.fit(
                train_ds,
                epochs=epochs,
                initial_epoch=int(epoch.numpy()),
                validation_data=val_ds,
                callbacks=[_Checkpointer(manager, epoch, results, log)],
                shuffle=False,  # the dataset shuffles itself each epoch
                verbose=0,
            )
    return model, results


def evaluate(model: LinearClassifier, val_ds: tf.data.Dataset) -> dict[str, float]:
    """Top-1 / top-5 (percent) of the classifier on `val_ds`."""
    with _finite_datasets():
        logs = model.evaluate(val_ds, verbose=0, return_dict=True)
    return {"top1": 100.0 * logs["top1"], "top5": 100.0 * logs["top5"]}


def sanity_check(backbone: FrozenBackbone, pretrained: str) -> int:
    """Load PATH again and compare every backbone variable (BN statistics included) with the
    one that was used; returns how many were compared, raises BackboneChangedError if any moved."""
    reference, _ = load_backbone(pretrained)
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
    backbone: FrozenBackbone, ds: tf.data.Dataset, batch_size: int, shuffle: bool, seed: int | None = None
) -> tuple[tf.data.Dataset, int]:
    """Precompute features of `ds` once; (batched (features, labels) dataset, number of examples)."""
    from moco_tf.knn import extract_features

    features, labels = extract_features(backbone, ds)
    return batched_features(features, labels, batch_size, shuffle, seed), len(labels)


def batched_features(
    features: np.ndarray, labels: np.ndarray, batch_size: int, shuffle: bool, seed: int | None = None
) -> tf.data.Dataset:
    """Features already extracted as a batched (features, labels) dataset, reshuffled each epoch if asked."""
    out = tf.data.Dataset.from_tensor_slices((features, np.asarray(labels).astype(np.int32)))
    if shuffle:
        out = out.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    return out.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _write_json(path: str, value) -> None:
    with tf.io.gfile.GFile(path, "w") as f:
        json.dump(value, f, indent=2)


def _read_results(model_dir: str) -> list:
    path = os.path.join(model_dir, RESULTS_FILE)
    if not tf.io.gfile.exists(path):
        return []
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def check_resume_config(model_dir: str, config: dict) -> None:
    """Write the run's settings to model_dir, or refuse to resume a run made with other ones."""
    path = os.path.join(model_dir, CONFIG_FILE)
    if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path) as f:
            old = json.load(f)
        differ = [
            f"--{k}={old.get(k)} before, now {config.get(k)}" for k in _RESUME_KEYS if old.get(k) != config.get(k)
        ]
        if differ:
            raise ValueError(
                f"--model_dir={model_dir} holds a linear classifier trained with other settings ("
                + "; ".join(differ)
                + "): use a new --model_dir"
            )
        return
    tf.io.gfile.makedirs(model_dir)
    _write_json(path, config)


# ----------------------------------------------------------------------------------------------
# CLI


def _define_flags() -> None:
    from absl import flags

    from moco_tf import flags as moco_flags

    moco_flags.define_evaluation_flags()
    flags.adopt_module_key_flags(moco_flags)  # listed by --help as this CLI's own
    flags.DEFINE_string("model_dir", None, "checkpoints and results of this linear run; a rerun resumes from it")
    flags.DEFINE_integer("batch_size", 256, "images per step (official: 256)")
    flags.DEFINE_integer("epochs", 100, "training epochs (official: 100)")
    flags.DEFINE_float("lr", 30.0, "SGD learning rate (official: 30)")
    flags.DEFINE_float("momentum", 0.9, "SGD momentum (official: 0.9)")
    flags.DEFINE_float("weight_decay", 0.0, "SGD weight decay, PyTorch style (official: 0)")
    flags.DEFINE_list("schedule", ["60", "80"], "epochs at which the learning rate drops x0.1 (official: 60,80)")
    flags.DEFINE_bool(
        "precompute_features",
        False,
        "extract features once (eval transform, no augmentation) and train on them: fast on CPU, "
        "but NOT the official protocol",
    )
    flags.DEFINE_integer("seed", None, "seed of the data order and augmentation")


def _main(argv) -> None:
    from absl import flags

    from moco_tf import cli, data

    FLAGS = flags.FLAGS
    cli.reject_extra_arguments(argv)
    if FLAGS.epochs < 1 or FLAGS.lr <= 0:
        raise ValueError(f"--epochs must be >= 1 and --lr > 0 (got {FLAGS.epochs}, {FLAGS.lr})")
    try:
        milestones = sorted(int(m) for m in FLAGS.schedule)
    except ValueError:
        raise ValueError(f"--schedule must be a list of epochs, e.g. 60,80 (got {','.join(FLAGS.schedule)})") from None
    backbone, info, source = load_for_evaluation(FLAGS.pretrained, FLAGS.dataset, FLAGS.data_dir, FLAGS.strict_data)
    image_size = FLAGS.image_size or info["image_size"]
    if FLAGS.model_dir:
        config = {k: getattr(FLAGS, k) for k in _RESUME_KEYS if k != "image_size"}
        config.update(image_size=image_size, pretrained=os.path.abspath(FLAGS.pretrained))
        check_resume_config(FLAGS.model_dir, config)
    else:
        print("no --model_dir: nothing is checkpointed, a rerun starts over")
    batch = FLAGS.batch_size

    def split(name, limit, train):
        return data.labelled_dataset(
            source, name, image_size, batch, train_aug=train and not FLAGS.precompute_features,
            shuffle=train and not FLAGS.precompute_features, seed=FLAGS.seed, subset=limit,
        )  # fmt: skip

    train_ds = split(source.train_split, FLAGS.limit_train, True)
    val_ds = split(source.eval_split, FLAGS.limit_val, False)
    n_train = min(FLAGS.limit_train or math.inf, source.num_examples(source.train_split))
    classifier_backbone = backbone
    if FLAGS.precompute_features:
        print("precomputing features (no augmentation: not the official protocol)")
        train_ds, n_train = feature_dataset(backbone, train_ds, batch, shuffle=True, seed=FLAGS.seed)
        val_ds, _ = feature_dataset(backbone, val_ds, batch, shuffle=False)
        classifier_backbone = None
    protocol = "precomputed features, no augmentation" if FLAGS.precompute_features else "official protocol"
    print(
        f"linear classification ({protocol}) of {info['description']} on {source.name}: "
        f"{n_train} train images, {source.num_classes} classes, image size {image_size}, batch {batch}, "
        f"{FLAGS.epochs} epochs, lr {FLAGS.lr} x0.1 at {milestones}"
    )
    model, _ = train_linear(
        classifier_backbone,
        train_ds,
        val_ds,
        source.num_classes,
        steps_per_epoch=math.ceil(n_train / batch),
        epochs=FLAGS.epochs,
        lr=FLAGS.lr,
        momentum=FLAGS.momentum,
        weight_decay=FLAGS.weight_decay,
        milestones=milestones,
        model_dir=FLAGS.model_dir,
    )
    final = evaluate(model, val_ds)
    print(f"final: val top-1 {final['top1']:.2f}%  top-5 {final['top5']:.2f}%  ({protocol})")
    try:
        count = sanity_check(backbone, FLAGS.pretrained)
    except BackboneChangedError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    print(f"sanity check passed: all {count} backbone variables (BN statistics included) equal {FLAGS.pretrained}")
    if FLAGS.model_dir:
        _write_json(os.path.join(FLAGS.model_dir, "lincls_final.json"), {**final, "protocol": protocol})


if __name__ == "__main__":
    from moco_tf.export import run_cli

    _define_flags()
    run_cli(_main, user_errors=(ImportError,))
