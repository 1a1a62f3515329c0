"""MoCo pretraining: `python -m moco_tf.train --flagfile=configs/v2.flags`.

Wires flags, strategy, data, model, optimizer, checkpoints and monitors together; rerunning the
same command with the same --model_dir resumes where the run stopped.
"""

from __future__ import annotations

import math
import os
import random
import signal
import tempfile

import keras
import tensorflow as tf
from absl import flags, logging

from moco_tf import augment, checkpoint, cli, data, distribute, export, knn, runlock
from moco_tf.callbacks import CheckpointEvery, StopOnNonFiniteLoss, StopOnSignal, TrainingLogs
from moco_tf.flags import define_train_flags
from moco_tf.model import check_queue_fits
from moco_tf.optimizers import SGD
from moco_tf.resnet import STANDARD_WIDTH
from moco_tf.schedules import EpochSchedule, scaled_lr

FLAGS = flags.FLAGS
_POLICIES = {"none": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


def config_from_flags() -> dict:
    """The run's recipe as saved in model_dir/config.json."""
    names = (
        "arch cifar_stem width dim mlp queue_size momentum temperature symmetric shuffle_bn bn_groups dataset "
        "image_size aug epochs batch_size lr schedule warmup_epochs weight_decay sgd_momentum seed"
    ).split()
    config = {name: FLAGS[name].value for name in names}
    config["milestones"] = [int(m) for m in FLAGS.milestones]
    config["moco_version"] = "v2" if FLAGS.mlp and FLAGS.aug == "v2" else "v1"
    return config


# Numeric flags and what they must be; checked before anything starts (NaN included: absl takes "nan").
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


def validate_flags() -> None:
    """Everything checkable before touching data or devices; one line each."""
    for name, (low, high, low_in, high_in, wording) in _FLOAT_RANGES.items():
        value = FLAGS[name].value
        if not math.isfinite(value) or not _in_range(value, low, high, low_in, high_in):
            raise cli.UsageError(f"--{name} must be a finite number {wording}, got {value}")
    for name in _POSITIVE_INTS:
        if FLAGS[name].value < 1:
            raise cli.UsageError(f"--{name} must be positive, got {FLAGS[name].value}")
    for name in _NON_NEGATIVE_INTS:
        if FLAGS[name].value < 0:
            raise cli.UsageError(f"--{name} must be >= 0, got {FLAGS[name].value}")
    for name in _OPTIONAL_POSITIVE_INTS:
        if FLAGS[name].value is not None and FLAGS[name].value < 1:
            raise cli.UsageError(f"--{name} must be positive (or unset), got {FLAGS[name].value}")
    if FLAGS.seed is not None and not 0 <= FLAGS.seed < 2**31:
        raise cli.UsageError(f"--seed must be in [0, 2**31), got {FLAGS.seed}")
    if FLAGS.warmup_epochs > FLAGS.epochs:
        raise cli.UsageError(f"--warmup_epochs {FLAGS.warmup_epochs} is more than --epochs {FLAGS.epochs}")
    try:
        check_queue_fits(FLAGS.queue_size, FLAGS.batch_size, FLAGS.symmetric)
    except ValueError as error:
        raise cli.UsageError(f"--{error}") from None
    try:
        milestones = [int(m) for m in FLAGS.milestones]
    except ValueError:
        raise cli.UsageError(f"--milestones must be epochs (integers), got {','.join(FLAGS.milestones)}") from None
    if any(m < 1 for m in milestones):
        raise cli.UsageError(f"--milestones must be positive epochs, got {','.join(FLAGS.milestones)}")
    if FLAGS.image_size < data.MIN_IMAGE_SIZE:
        raise cli.UsageError(f"--image_size {FLAGS.image_size} is too small (at least {data.MIN_IMAGE_SIZE})")


def default_model_dir() -> str:
    arch = FLAGS.arch if FLAGS.width == STANDARD_WIDTH else f"{FLAGS.arch}w{FLAGS.width}"
    return os.path.join("runs", f"{FLAGS.dataset}-{arch}-{FLAGS.aug}")


def check_writable(model_dir: str) -> None:
    if model_dir.startswith("gs://"):
        return  # checked by the first write; local probing does not apply
    try:
        os.makedirs(model_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=model_dir):
            pass
    except OSError as error:
        raise cli.UsageError(f"--model_dir {model_dir} is not writable: {error.strerror}") from None


def _write_view_pairs(source, log_dir: str, seed) -> None:
    """One TensorBoard image of augmented view pairs, to see what the encoders are fed."""
    pairs = next(iter(data.pretrain_dataset(source, source.pretrain_split, FLAGS.image_size, FLAGS.aug, 8, seed)))
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


def main(argv) -> None:
    cli.reject_extra_arguments(argv)
    with distribute.peer_failures():  # a lost worker of a multi-worker run: one line, not a traceback
        train_from_flags()


def train_from_flags() -> keras.Model:
    """The whole run from the parsed flags; returns the trained model."""
    validate_flags()
    config = config_from_flags()
    model_dir = FLAGS.model_dir or default_model_dir()
    # Before the strategy: a mistake found once the workers of a multi-worker run are connected
    # would look to the other workers like a lost peer.
    saved = checkpoint.read_config(model_dir)
    if saved is not None:
        checkpoint.check_same_run(saved, config, model_dir)

    strategy = distribute.make_strategy(FLAGS.strategy, FLAGS.tpu, FLAGS.peer_timeout)
    chief = distribute.is_chief(strategy)
    replicas = strategy.num_replicas_in_sync
    if FLAGS.batch_size % replicas:
        raise cli.UsageError(f"--batch_size {FLAGS.batch_size} is not divisible by the {replicas} replicas")
    if (FLAGS.batch_size // replicas) % FLAGS.bn_groups:
        raise cli.UsageError(f"the per-replica batch {FLAGS.batch_size // replicas} is not divisible by --bn_groups")
    source = data.make_source(FLAGS.dataset, FLAGS.data_dir, strict=FLAGS.strict_data)
    steps_per_epoch = FLAGS.steps_per_epoch or source.num_examples(source.pretrain_split) // FLAGS.batch_size
    if steps_per_epoch < 1:
        raise cli.UsageError(
            f"{source.name} has {source.num_examples(source.pretrain_split)} images, fewer than one --batch_size"
        )

    lock = None
    if chief:
        check_writable(model_dir)
        lock = runlock.RunLock(model_dir).acquire()  # released by the OS if this process dies
        if runlock.describe_previous(lock):
            print(runlock.describe_previous(lock))
    try:
        return _train(config, saved, model_dir, strategy, chief, source, steps_per_epoch)
    finally:
        if lock is not None:
            lock.release()


def _train(
    config: dict, saved: dict | None, model_dir: str, strategy, chief: bool, source, steps_per_epoch: int
) -> keras.Model:
    export_overwrite = _check_export_dir(model_dir) if chief else False
    run_ckpt_dir = os.path.join(model_dir, checkpoint.CHECKPOINT_DIR)
    if chief:
        for path in checkpoint.remove_leftovers(run_ckpt_dir, model_dir):
            print(f"removed {path}, left by an interrupted run")
    latest = checkpoint.newest_intact(run_ckpt_dir, log=print if chief else None, repair=chief)
    if saved is None and latest is not None:
        raise checkpoint.CheckpointError(f"{model_dir} holds checkpoints but no {checkpoint.CONFIG_FILE}; restore it")

    if FLAGS.seed is not None:
        keras.utils.set_random_seed(FLAGS.seed)
    if FLAGS.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(_POLICIES[FLAGS.mixed_precision])

    with strategy.scope():
        model = checkpoint.build_model(config)
        schedule = EpochSchedule(
            scaled_lr(FLAGS.lr, FLAGS.batch_size), steps_per_epoch, FLAGS.epochs, FLAGS.schedule,
            config["milestones"], FLAGS.warmup_epochs,
        )
        optimizer = SGD(schedule, momentum=FLAGS.sgd_momentum, weight_decay=FLAGS.weight_decay)
        model.compile(optimizer=optimizer, jit_compile=FLAGS.jit_compile)
        epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        # The data order's seed is part of the checkpoint, so a resumed run continues the same stream.
        # Created in scope: multi-worker strategies give every worker the chief's initial value.
        data_seed = tf.Variable(
            FLAGS.seed if FLAGS.seed is not None else random.SystemRandom().randrange(2**31),
            dtype=tf.int64, trainable=False, name="data_seed",
        )
        ckpt = checkpoint.make_checkpoint(model, optimizer, epoch, data_seed=data_seed)

    ckpt_dir = checkpoint.worker_checkpoint_dir(model_dir, chief)
    manager = checkpoint.manager(ckpt, ckpt_dir, FLAGS.keep_checkpoints)
    if latest:
        ckpt.restore(latest).assert_existing_objects_matched()
        print(f"resuming {model_dir} from step {int(optimizer.iterations.numpy())} (epoch {int(epoch.numpy())})")
    elif chief:
        checkpoint.write_config(model_dir, config)

    step = int(optimizer.iterations.numpy())
    distribute.check_same_on_all_workers(
        strategy, step, "the step restored from --model_dir", "--model_dir must be one folder every worker reads"
    )
    total = FLAGS.epochs * steps_per_epoch
    if FLAGS.max_steps:
        total = min(total, FLAGS.max_steps)
    log_dir = os.path.join(model_dir, "logs")
    seed = int(data_seed.numpy())

    stop = StopOnSignal(FLAGS.stop_grace_s)
    # Order matters: the loss guard runs before anything saves the step it rejects.
    callbacks: list[keras.callbacks.Callback] = [StopOnNonFiniteLoss(manager), stop]
    if FLAGS.knn_every and source.num_classes and source.eval_split:
        eval_batch = max(FLAGS.batch_size, 64)
        train_ds = data.labelled_dataset(source, source.train_split, FLAGS.image_size, eval_batch)
        val_ds = data.labelled_dataset(source, source.eval_split, FLAGS.image_size, eval_batch)
        monitor = knn.KNNMonitor(
            train_ds, val_ds, FLAGS.knn_every, log_dir=log_dir if chief else None, k=FLAGS.knn_k, t=FLAGS.knn_t,
            num_classes=source.num_classes, class_names=source.class_names,
        )
        callbacks.append(monitor)
        if step == 0 and chief:
            before = knn.evaluate(model.backbone_q, train_ds, val_ds, FLAGS.knn_k, FLAGS.knn_t, source.num_classes)
            print(f"kNN top-1 before training: {before.top1:.2f}%")
    callbacks.append(TrainingLogs(schedule, FLAGS.batch_size, FLAGS.epochs, print_summary=chief))
    callbacks.append(CheckpointEvery(manager, epoch, FLAGS.checkpoint_every, steps_per_epoch, stop))
    if chief:
        callbacks.append(keras.callbacks.TensorBoard(log_dir, update_freq=FLAGS.log_every, write_graph=False))
        if step == 0:
            _write_view_pairs(source, log_dir, seed)

    history = {}
    stop.install()
    try:
        for initial_epoch, epochs, steps in _segments(step, total, steps_per_epoch):
            # A new stream for each fit() call, positioned at the step it starts from (segments are
            # contiguous, so that is the current step): fit restarts whatever iterator it is given.
            dataset = strategy.distribute_datasets_from_function(
                lambda context, start=step: data.pretrain_dataset(
                    source, source.pretrain_split, FLAGS.image_size, FLAGS.aug, FLAGS.batch_size, seed, context,
                    start_step=start,
                )
            )
            result = model.fit(
                dataset, initial_epoch=initial_epoch, epochs=epochs, steps_per_epoch=steps,
                callbacks=callbacks, verbose=1 if chief else 0, shuffle=False,
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
        raise cli.RunInterrupted(
            f"stopped by {cause} at step {step}: checkpoint saved in {model_dir}; rerun the same command to resume",
            stop.received,
        )
    if step >= total and not history:
        print(f"{model_dir} already holds {step} steps of {total}: nothing to train")

    if chief and "knn_top1" in history:
        print(f"kNN top-1 after training: {history['knn_top1'][-1]:.2f}%")
    if chief:
        print(f"checkpoints and TensorBoard logs in {model_dir}")
    if FLAGS.export_dir and chief:
        extra = {"epochs": int(epoch.numpy()), "dataset": FLAGS.dataset, "aug": FLAGS.aug,
                 "moco_version": config["moco_version"], "source": _export_source(model_dir)}
        path = export.export_moco(model, FLAGS.export_dir, extra, overwrite=export_overwrite,
                                  protected=(model_dir,), overwrite_flag="--overwrite_export")
        print(f"exported the query backbone to {path} (load it with hub.KerasLayer)")
    return model


def _export_source(model_dir: str) -> str:
    return f"moco_tf model_dir {os.path.abspath(model_dir)}"


def _check_export_dir(model_dir: str) -> bool:
    """Checks --export_dir before training (not after hours of it); returns whether the export at the
    end may replace what is there: a moco_tf export of this same run, or any moco_tf export with
    --overwrite_export. Never the model_dir, a folder around it, or anything that is not an export."""
    if not FLAGS.export_dir:
        return False
    # First pass: refuses the model_dir and non-exports, and puts back an export that a killed
    # replacement had moved aside, so that the second pass sees what is really there.
    export.check_export_target(FLAGS.export_dir, overwrite=True, protected=(model_dir,))
    overwrite = FLAGS.overwrite_export or export.export_source(FLAGS.export_dir) == _export_source(model_dir)
    export.check_export_target(
        FLAGS.export_dir, overwrite=overwrite, protected=(model_dir,), overwrite_flag="--overwrite_export"
    )
    return overwrite


USER_ERRORS = (
    data.DataError, distribute.StrategyError, checkpoint.RunMismatchError, runlock.RunLockedError, ValueError,
)


def run(argv: list[str] | None = None) -> None:
    """The command line: flags from argv (default sys.argv), user mistakes reported in one line."""
    define_train_flags()
    logging.set_verbosity(logging.WARNING)
    cli.run(main, user_errors=USER_ERRORS, argv=argv)


if __name__ == "__main__":
    run()
