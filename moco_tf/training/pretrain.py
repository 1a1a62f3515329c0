"""A whole MoCo pretraining run as one library call: `pretrain(settings)`.

Wires strategy, data, model, optimizer, checkpoints and monitors together; calling it again with
the same model_dir resumes where the run stopped. `settings` holds the values of the training
command line's flags (`python -m moco_tf.train`), by the same names: the absl FLAGS themselves,
or a `types.SimpleNamespace` built in Python (see `moco_tf.cli.flags.define_train_flags` for
each name's meaning and default).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import signal
import tempfile
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from moco_tf.data import augment, pipelines, sources
from moco_tf.errors import RunInterrupted, UserError
from moco_tf.evaluation import knn
from moco_tf.models.moco import check_queue_fits
from moco_tf.models.resnet import STANDARD_WIDTH
from moco_tf.training import checkpoint, distribute, runlock
from moco_tf.training.callbacks import CheckpointEvery, StepLines, StopOnNonFiniteLoss, StopOnSignal, TrainingLogs
from moco_tf.training.optimizers import SGD
from moco_tf.training.schedules import EpochSchedule, scaled_lr

_POLICIES = {"none": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
# The recipe's settings, saved in model_dir/config.json (milestones and moco_version are added).
_RECIPE_NAMES = (
    "arch cifar_stem width dim mlp queue_size momentum temperature symmetric shuffle_bn bn_groups dataset "
    "image_size aug epochs batch_size lr schedule warmup_epochs weight_decay sgd_momentum seed"
).split()
# Progress while fit runs: Keras's interactive bar (a terminal), one plain line per log_every
# steps (a log file: no carriage returns, no colours), or nothing (a non-chief worker).
PROGRESS = ("bar", "lines", "none")


@dataclasses.dataclass
class PretrainResult:
    """What a run leaves: the trained model, Keras's history of its last fit() call, where it is
    saved, whether this process is the chief (the one that writes), and the epochs done."""

    model: keras.Model
    history: dict[str, list[Any]]
    model_dir: str
    chief: bool
    epochs_done: int


def recipe(settings: Any) -> dict[str, Any]:
    """The run's recipe as saved in model_dir/config.json."""
    config = {name: getattr(settings, name) for name in _RECIPE_NAMES}
    config["milestones"] = [int(m) for m in settings.milestones]
    config["moco_version"] = "v2" if settings.mlp and settings.aug == "v2" else "v1"
    return config


# Numeric settings and what they must be; checked before anything starts (NaN included: absl takes "nan").
_POSITIVE_INTS = ("epochs", "batch_size", "queue_size", "dim", "bn_groups", "image_size", "width", "log_every",
                  "keep_checkpoints", "knn_k")
_NON_NEGATIVE_INTS = ("warmup_epochs", "checkpoint_every", "knn_every")
_OPTIONAL_POSITIVE_INTS = ("steps_per_epoch", "max_steps")
_FLOAT_RANGES = {  # name: (low, high, low inclusive, high inclusive, wording)
    "lr": (0.0, math.inf, False, False, "> 0"),
    "temperature": (0.0, math.inf, False, False, "> 0"),
    "momentum": (0.0, 1.0, True, False, "in [0, 1)"),
    "sgd_momentum": (0.0, 1.0, True, False, "in [0, 1)"),
    "weight_decay": (0.0, math.inf, True, False, ">= 0"),
    "knn_t": (0.0, math.inf, False, False, "> 0"),
    "stop_grace_s": (0.0, math.inf, False, False, "> 0"),
    "peer_timeout": (0.0, math.inf, False, False, "> 0"),
}


def _in_range(value: float, low: float, high: float, low_in: bool, high_in: bool) -> bool:
    return (value >= low if low_in else value > low) and (value <= high if high_in else value < high)


def validate(settings: Any) -> None:
    """Everything checkable before touching data or devices; a UserError of one line naming the flag."""
    for name, (low, high, low_in, high_in, wording) in _FLOAT_RANGES.items():
        value = getattr(settings, name)
        if not math.isfinite(value) or not _in_range(value, low, high, low_in, high_in):
            raise UserError(f"--{name} must be a finite number {wording}, got {value}")
    for name in _POSITIVE_INTS:
        if getattr(settings, name) < 1:
            raise UserError(f"--{name} must be positive, got {getattr(settings, name)}")
    for name in _NON_NEGATIVE_INTS:
        if getattr(settings, name) < 0:
            raise UserError(f"--{name} must be >= 0, got {getattr(settings, name)}")
    for name in _OPTIONAL_POSITIVE_INTS:
        value = getattr(settings, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be positive (or unset), got {value}")
    if settings.seed is not None and not 0 <= settings.seed < 2**31:
        raise UserError(f"--seed must be in [0, 2**31), got {settings.seed}")
    if settings.warmup_epochs > settings.epochs:
        raise UserError(f"--warmup_epochs {settings.warmup_epochs} is more than --epochs {settings.epochs}")
    try:
        check_queue_fits(settings.queue_size, settings.batch_size, settings.symmetric)
    except ValueError as error:
        raise UserError(f"--{error}") from None
    shown = ",".join(str(m) for m in settings.milestones)
    try:
        milestones = [int(m) for m in settings.milestones]
    except ValueError:
        raise UserError(f"--milestones must be epochs (integers), got {shown}") from None
    if any(m < 1 for m in milestones):
        raise UserError(f"--milestones must be positive epochs, got {shown}")
    if settings.image_size < sources.MIN_IMAGE_SIZE:
        raise UserError(f"--image_size {settings.image_size} is too small (at least {sources.MIN_IMAGE_SIZE})")


def default_model_dir(settings: Any) -> str:
    """runs/DATASET-ARCH-AUG (ARCH with its width when not the standard one)."""
    arch = settings.arch if settings.width == STANDARD_WIDTH else f"{settings.arch}w{settings.width}"
    return os.path.join("runs", f"{settings.dataset}-{arch}-{settings.aug}")


def check_writable(model_dir: str) -> None:
    """A UserError now rather than a failed save after the first steps."""
    if model_dir.startswith("gs://"):
        return  # checked by the first write; local probing does not apply
    try:
        os.makedirs(model_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=model_dir):
            pass
    except OSError as error:
        raise UserError(f"--model_dir {model_dir} is not writable: {error.strerror}") from None


def _write_view_pairs(source: sources.Source, log_dir: str, image_size: int, aug: str, seed: int) -> None:
    """One TensorBoard image of augmented view pairs, to see what the encoders are fed."""
    pairs = next(iter(pipelines.pretrain_dataset(source, source.pretrain_split, image_size, aug, 8, seed)))
    mean, std = tf.constant(augment.IMAGENET_MEAN), tf.constant(augment.IMAGENET_STD)
    images = tf.clip_by_value(pairs * std + mean, 0.0, 1.0)  # [8, 2, S, S, 3]
    side_by_side = tf.concat([images[:, 0], images[:, 1]], axis=2)
    with tf.summary.create_file_writer(os.path.join(log_dir, "views")).as_default():
        tf.summary.image("view_pairs", side_by_side, step=0, max_outputs=8)


def _segments(step: int, total: int, steps_per_epoch: int) -> list[tuple[int, int, int]]:
    """fit() calls (initial_epoch, epochs, steps_per_epoch) from `step` to `total`: first the
    rest of an interrupted epoch, then whole epochs, then a final partial one (--max_steps)."""
    out = []
    while step < total:
        epoch, offset = divmod(step, steps_per_epoch)
        if offset or total - step < steps_per_epoch:
            n = min(steps_per_epoch - offset, total - step)
            out.append((epoch, epoch + 1, n))
            step += n
        else:
            whole = (total - step) // steps_per_epoch
            out.append((epoch, epoch + whole, steps_per_epoch))
            step += whole * steps_per_epoch
    return out


def pretrain(
    settings: Any,
    progress: str = "bar",
    before_training: Callable[[str], None] | None = None,
) -> PretrainResult:
    """The whole run: validate, build, resume if model_dir holds a checkpoint, train, save.

    progress: "bar" (Keras's interactive progress bar), "lines" (one plain line every
        `settings.log_every` steps, for logs that are files) or "none"; only the chief prints.
    before_training: called on the chief with the model_dir once the run lock is held, before
        anything is built (the training command line checks --export_dir there).

    Raises UserError (and its kinds: DataError, StrategyError, ...) for a mistake in the
    settings, RunFailed when the run cannot go on, RunInterrupted after a stop on a signal.
    """
    if progress not in PROGRESS:
        raise ValueError(f"progress must be one of {', '.join(PROGRESS)}, got {progress!r}")
    validate(settings)
    config = recipe(settings)
    model_dir = settings.model_dir or default_model_dir(settings)
    # Before the strategy: a mistake found once the workers of a multi-worker run are connected
    # would look to the other workers like a lost peer.
    saved = checkpoint.read_config(model_dir)
    if saved is not None:
        checkpoint.check_same_run(saved, config, model_dir)

    strategy = distribute.make_strategy(settings.strategy, settings.tpu, settings.peer_timeout)
    chief = distribute.is_chief(strategy)
    replicas = strategy.num_replicas_in_sync
    if settings.batch_size % replicas:
        raise UserError(f"--batch_size {settings.batch_size} is not divisible by the {replicas} replicas")
    if (settings.batch_size // replicas) % settings.bn_groups:
        raise UserError(f"the per-replica batch {settings.batch_size // replicas} is not divisible by --bn_groups")
    source = sources.make_source(settings.dataset, settings.data_dir, strict=settings.strict_data)
    steps_per_epoch = settings.steps_per_epoch or source.num_examples(source.pretrain_split) // settings.batch_size
    if steps_per_epoch < 1:
        raise UserError(
            f"{source.name} has {source.num_examples(source.pretrain_split)} images, fewer than one --batch_size"
        )

    lock = None
    if chief:
        check_writable(model_dir)
        lock = runlock.RunLock(model_dir).acquire()  # released by the OS if this process dies
        if runlock.describe_previous(lock):
            print(runlock.describe_previous(lock))
    try:
        if chief and before_training is not None:
            before_training(model_dir)
        return _train(settings, config, saved, model_dir, strategy, chief, source, steps_per_epoch,
                      progress if chief else "none")
    finally:
        if lock is not None:
            lock.release()


def _train(
    settings: Any, config: dict, saved: dict | None, model_dir: str, strategy, chief: bool,
    source: sources.Source, steps_per_epoch: int, progress: str,
) -> PretrainResult:
    run_ckpt_dir = os.path.join(model_dir, checkpoint.CHECKPOINT_DIR)
    if chief:
        for path in checkpoint.remove_leftovers(run_ckpt_dir, model_dir):
            print(f"removed {path}, left by an interrupted run")
    latest = checkpoint.newest_intact(run_ckpt_dir, log=print if chief else None, repair=chief)
    if saved is None and latest is not None:
        raise checkpoint.CheckpointError(f"{model_dir} holds checkpoints but no {checkpoint.CONFIG_FILE}; restore it")

    if settings.seed is not None:
        keras.utils.set_random_seed(settings.seed)
    if settings.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(_POLICIES[settings.mixed_precision])

    with strategy.scope():
        model = checkpoint.build_model(config)
        schedule = EpochSchedule(
            scaled_lr(settings.lr, settings.batch_size), steps_per_epoch, settings.epochs, settings.schedule,
            config["milestones"], settings.warmup_epochs,
        )
        optimizer = SGD(schedule, momentum=settings.sgd_momentum, weight_decay=settings.weight_decay)
        model.compile(optimizer=optimizer, jit_compile=settings.jit_compile)
        epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        # The data order's seed is part of the checkpoint, so a resumed run continues the same stream.
        # Created in scope: multi-worker strategies give every worker the chief's initial value.
        data_seed = tf.Variable(
            settings.seed if settings.seed is not None else random.SystemRandom().randrange(2**31),
            dtype=tf.int64, trainable=False, name="data_seed",
        )
        ckpt = checkpoint.make_checkpoint(model, optimizer, epoch, data_seed=data_seed)

    ckpt_dir = checkpoint.worker_checkpoint_dir(model_dir, chief)
    manager = checkpoint.manager(ckpt, ckpt_dir, settings.keep_checkpoints)
    if latest:
        ckpt.restore(latest).assert_existing_objects_matched()
        print(f"resuming {model_dir} from step {int(optimizer.iterations.numpy())} (epoch {int(epoch.numpy())})")
    elif chief:
        checkpoint.write_config(model_dir, config)

    step = int(optimizer.iterations.numpy())
    distribute.check_same_on_all_workers(
        strategy, step, "the step restored from --model_dir", "--model_dir must be one folder every worker reads"
    )
    total = settings.epochs * steps_per_epoch
    if settings.max_steps:
        total = min(total, settings.max_steps)
    log_dir = os.path.join(model_dir, "logs")
    seed = int(data_seed.numpy())

    stop = StopOnSignal(settings.stop_grace_s)
    # Order matters: the loss guard runs before anything saves the step it rejects.
    callbacks: list[keras.callbacks.Callback] = [StopOnNonFiniteLoss(manager), stop]
    if settings.knn_every and source.num_classes and source.eval_split:
        eval_batch = max(settings.batch_size, 64)
        train_ds = pipelines.labelled_dataset(source, source.train_split, settings.image_size, eval_batch)
        val_ds = pipelines.labelled_dataset(source, source.eval_split, settings.image_size, eval_batch)
        monitor = knn.KNNMonitor(
            train_ds, val_ds, settings.knn_every, log_dir=log_dir if chief else None, k=settings.knn_k,
            t=settings.knn_t, num_classes=source.num_classes, class_names=source.class_names,
        )
        callbacks.append(monitor)
        if step == 0 and chief:
            before = knn.evaluate(
                model.backbone_q, train_ds, val_ds, settings.knn_k, settings.knn_t, source.num_classes
            )
            print(f"kNN top-1 before training: {before.top1:.2f}%")
    callbacks.append(TrainingLogs(schedule, settings.batch_size, settings.epochs, print_summary=chief))
    if progress == "lines":
        callbacks.append(StepLines(schedule, settings.batch_size, settings.log_every, total))
    callbacks.append(CheckpointEvery(manager, epoch, settings.checkpoint_every, steps_per_epoch, stop))
    if chief:
        callbacks.append(keras.callbacks.TensorBoard(log_dir, update_freq=settings.log_every, write_graph=False))
        if step == 0:
            _write_view_pairs(source, log_dir, settings.image_size, settings.aug, seed)

    history = {}
    stop.install()
    try:
        for initial_epoch, epochs, steps in _segments(step, total, steps_per_epoch):
            # A new stream for each fit() call, positioned at the step it starts from (segments are
            # contiguous, so that is the current step): fit restarts whatever iterator it is given.
            dataset = strategy.distribute_datasets_from_function(
                lambda context, start=step: pipelines.pretrain_dataset(
                    source, source.pretrain_split, settings.image_size, settings.aug, settings.batch_size, seed,
                    context, start_step=start,
                )
            )
            result = model.fit(
                dataset, initial_epoch=initial_epoch, epochs=epochs, steps_per_epoch=steps,
                callbacks=callbacks, verbose=1 if progress == "bar" else 0, shuffle=False,
            )
            history = result.history
            step = int(optimizer.iterations.numpy())
            if stop.requested:
                break
    finally:
        stop.uninstall()
        checkpoint.remove_worker_dir(ckpt_dir, chief)
    if stop.requested:
        cause = "another worker's SIGTERM" if stop.by_peer else signal.Signals(stop.received).name
        raise RunInterrupted(
            f"stopped by {cause} at step {step}: checkpoint saved in {model_dir}; rerun the same command to resume",
            stop.received,
        )
    if step >= total and not history:
        print(f"{model_dir} already holds {step} steps of {total}: nothing to train")

    if chief and "knn_top1" in history:
        print(f"kNN top-1 after training: {history['knn_top1'][-1]:.2f}%")
    if chief:
        print(f"checkpoints and TensorBoard logs in {model_dir}")
    return PretrainResult(model, history, model_dir, chief, int(epoch.numpy()))
