"""MoCo pretraining: `python -m moco_tf.train --flagfile=configs/v2.flags`.

Wires flags, strategy, data, model, optimizer, checkpoints and monitors together; rerunning the
same command with the same --model_dir resumes where the run stopped.
"""

from __future__ import annotations

import os
import tempfile

import keras
import tensorflow as tf
from absl import flags, logging

from moco_tf import augment, checkpoint, cli, data, distribute, knn
from moco_tf.callbacks import CheckpointEvery, TrainingLogs
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


def validate_flags() -> None:
    """Everything checkable before touching data or devices; one line each."""
    if FLAGS.temperature <= 0:
        raise cli.UsageError(f"--temperature must be > 0, got {FLAGS.temperature}")
    if not 0.0 <= FLAGS.momentum < 1.0:
        raise cli.UsageError(f"--momentum must be in [0, 1), got {FLAGS.momentum}")
    for name in ("epochs", "batch_size", "queue_size", "dim", "bn_groups", "image_size", "width"):
        if FLAGS[name].value < 1:
            raise cli.UsageError(f"--{name} must be positive, got {FLAGS[name].value}")
    try:
        check_queue_fits(FLAGS.queue_size, FLAGS.batch_size, FLAGS.symmetric)
    except ValueError as error:
        raise cli.UsageError(f"--{error}") from None
    try:
        [int(m) for m in FLAGS.milestones]
    except ValueError:
        raise cli.UsageError(f"--milestones must be epochs (integers), got {','.join(FLAGS.milestones)}") from None
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
    train_from_flags()


def train_from_flags() -> keras.Model:
    """The whole run from the parsed flags; returns the trained model."""
    validate_flags()
    config = config_from_flags()
    model_dir = FLAGS.model_dir or default_model_dir()

    strategy = distribute.make_strategy(FLAGS.strategy, FLAGS.tpu)
    chief = distribute.is_chief(strategy)
    replicas = strategy.num_replicas_in_sync
    if FLAGS.batch_size % replicas:
        raise cli.UsageError(f"--batch_size {FLAGS.batch_size} is not divisible by the {replicas} replicas")
    if (FLAGS.batch_size // replicas) % FLAGS.bn_groups:
        raise cli.UsageError(f"the per-replica batch {FLAGS.batch_size // replicas} is not divisible by --bn_groups")
    if FLAGS.seed is not None:
        keras.utils.set_random_seed(FLAGS.seed)
    if FLAGS.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(_POLICIES[FLAGS.mixed_precision])

    source = data.make_source(FLAGS.dataset, FLAGS.data_dir, strict=FLAGS.strict_data)
    steps_per_epoch = FLAGS.steps_per_epoch or source.num_examples(source.pretrain_split) // FLAGS.batch_size
    if steps_per_epoch < 1:
        raise cli.UsageError(
            f"{source.name} has {source.num_examples(source.pretrain_split)} images, fewer than one --batch_size"
        )
    if chief:
        check_writable(model_dir)
    saved = checkpoint.read_config(model_dir)
    if saved is not None:
        checkpoint.check_same_run(saved, config, model_dir)

    with strategy.scope():
        model = checkpoint.build_model(config)
        schedule = EpochSchedule(
            scaled_lr(FLAGS.lr, FLAGS.batch_size), steps_per_epoch, FLAGS.epochs, FLAGS.schedule,
            config["milestones"], FLAGS.warmup_epochs,
        )
        optimizer = SGD(schedule, momentum=FLAGS.sgd_momentum, weight_decay=FLAGS.weight_decay)
        model.compile(optimizer=optimizer, jit_compile=FLAGS.jit_compile)
        epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        ckpt = checkpoint.make_checkpoint(model, optimizer, epoch)

    ckpt_dir = checkpoint.worker_checkpoint_dir(model_dir, chief)
    manager = checkpoint.manager(ckpt, ckpt_dir, FLAGS.keep_checkpoints)
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, checkpoint.CHECKPOINT_DIR))
    if latest:
        ckpt.restore(latest).assert_existing_objects_matched()
        print(f"resuming {model_dir} from step {int(optimizer.iterations.numpy())} (epoch {int(epoch.numpy())})")
    elif chief:
        checkpoint.write_config(model_dir, config)

    step = int(optimizer.iterations.numpy())
    total = FLAGS.epochs * steps_per_epoch
    if FLAGS.max_steps:
        total = min(total, FLAGS.max_steps)
    log_dir = os.path.join(model_dir, "logs")

    callbacks: list[keras.callbacks.Callback] = []
    monitor = None
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
    callbacks.append(CheckpointEvery(manager, epoch, FLAGS.checkpoint_every))
    if chief:
        callbacks.append(keras.callbacks.TensorBoard(log_dir, update_freq=FLAGS.log_every, write_graph=False))
        if step == 0:
            _write_view_pairs(source, log_dir, FLAGS.seed)

    dataset = strategy.distribute_datasets_from_function(
        lambda context: data.pretrain_dataset(
            source, source.pretrain_split, FLAGS.image_size, FLAGS.aug, FLAGS.batch_size, FLAGS.seed, context
        )
    )
    history = {}
    for initial_epoch, epochs, steps in _segments(step, total, steps_per_epoch):
        result = model.fit(
            dataset, initial_epoch=initial_epoch, epochs=epochs, steps_per_epoch=steps,
            callbacks=callbacks, verbose=1 if chief else 0, shuffle=False,
        )
        history = result.history
    if step >= total:
        print(f"{model_dir} already holds {step} steps of {total}: nothing to train")
    checkpoint.remove_worker_dir(ckpt_dir, chief)

    if chief and "knn_top1" in history:
        print(f"kNN top-1 after training: {history['knn_top1'][-1]:.2f}%")
    if chief:
        print(f"checkpoints and TensorBoard logs in {model_dir}")
    if FLAGS.export_dir and chief:
        from moco_tf.export import export_moco

        extra = {"epochs": int(epoch.numpy()), "dataset": FLAGS.dataset, "aug": FLAGS.aug,
                 "moco_version": config["moco_version"], "source": f"moco_tf model_dir {os.path.abspath(model_dir)}"}
        path = export_moco(model, FLAGS.export_dir, extra, overwrite=True)
        print(f"exported the query backbone to {path} (load it with hub.KerasLayer)")
    return model


def run() -> None:
    define_train_flags()
    logging.set_verbosity(logging.WARNING)
    cli.run(main, user_errors=(data.DataError, distribute.StrategyError, checkpoint.RunMismatchError, ValueError))


if __name__ == "__main__":
    run()
