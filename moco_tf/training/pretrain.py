"""A whole MoCo pretraining run as one library call: `pretrain(config)`.

Wires strategy, data, model, optimizer, checkpoints and monitors together; calling it again with
the same model_dir resumes where the run stopped. `config` is a `PretrainConfig`
(moco_tf.training.config), built in Python or from the training command line's flags:

    from moco_tf import PretrainConfig, pretrain
    from moco_tf.training.config import OptimConfig
    model, history = pretrain(PretrainConfig(optim=OptimConfig(epochs=1, batch_size=32)))
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import signal
import tempfile
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from moco_tf import reporting
from moco_tf.data import pipelines, sources
from moco_tf.errors import RunInterrupted, UserError
from moco_tf.evaluation import knn
from moco_tf.models import backbones
from moco_tf.training import checkpoint, checkpoint_files, data_health, distribute, guardrails, runlock, warm_start
from moco_tf.training.callbacks import (
    CheckpointEvery,
    StepLines,
    StopOnNonFiniteLoss,
    StopOnSignal,
    TrainingLogs,
    passed_multiple,
)
from moco_tf.training.config import PRECISION_POLICIES, ConfigError, PretrainConfig, check_same_run
from moco_tf.training.optimizers import SGD
from moco_tf.training.schedules import EpochSchedule, scaled_lr

# Progress while fit runs: Keras's interactive bar (a terminal), one plain line per log_every
# steps (a log file: no carriage returns, no colours), or nothing (a non-chief worker).
PROGRESS = ("bar", "lines", "none")
# --steps_per_execution on a TPU when unset: the largest divisor of --log_every and
# --checkpoint_every up to this. Enough steps per host call to hide the call's overhead, few enough
# that a SIGTERM (answered between calls) is handled well within --stop_grace_s.
AUTO_TPU_STEPS_PER_EXECUTION = 32

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PretrainResult:
    """What a run leaves: the trained model, Keras's history of its last fit() call, where it is
    saved, whether this process is the chief (the one that writes), and the epochs done."""

    model: keras.Model
    history: dict[str, list[Any]]
    model_dir: str
    chief: bool
    epochs_done: int

    def __iter__(self):  # `model, history = pretrain(config)`
        return iter((self.model, self.history))


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


def _write_view_pairs(source: sources.Source, log_dir: str, config: PretrainConfig, seed: int) -> None:
    """One TensorBoard image of augmented view pairs, to see what the encoders are fed."""
    data = config.data
    pairs = next(iter(pipelines.pretrain_dataset(
        source, source.pretrain_split, data.image_size, data.aug, 8, seed, views=data.view_options()
    )))["views"]
    mean, std = tf.constant(backbones.IMAGENET_MEAN), tf.constant(backbones.IMAGENET_STD)
    images = tf.clip_by_value(pairs * std + mean, 0.0, 1.0)  # [8, 2, S, S, 3]
    side_by_side = tf.concat([images[:, 0], images[:, 1]], axis=2)
    with tf.summary.create_file_writer(os.path.join(log_dir, "views")).as_default():
        tf.summary.image("view_pairs", side_by_side, step=0, max_outputs=8)


class _TensorBoard(keras.callbacks.TensorBoard):
    """Batch scalars at the optimizer's step: Keras counts from 0 again in every fit() call (each
    resume, each segment of `_segments`), which would draw a resumed run over its own start."""

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._global_train_batch = int(self.model.optimizer.iterations.numpy())  # Keras's own counter
        self._step_before = self._global_train_batch

    # Keras adds 1 per hook call, which is a call of steps_per_execution steps: the step is the
    # optimizer's instead, and a scalar is due when a call reached or passed a multiple of log_every.
    def on_train_batch_end(self, batch, logs=None):
        self._global_train_batch = int(self.model.optimizer.iterations.numpy())
        super().on_train_batch_end(batch, logs)
        self._step_before = self._global_train_batch

    def _push_writer(self, writer, step):
        if self.update_freq == "epoch":
            return super()._push_writer(writer, step)
        context = (writer.as_default(step), self.summary.record_if(
            lambda: passed_multiple(self._step_before, self._global_train_batch, self.update_freq)
        ))
        self._prev_summary_state.append(context)
        context[0].__enter__()
        context[1].__enter__()

    def _log_epoch_metrics(self, epoch, logs):
        # Keras leaves the last batch's record_if(step % update_freq == 0) in force here: an epoch
        # whose last step is no multiple of --log_every would write no epoch_* scalar (lr, kNN).
        with tf.summary.record_if(True):
            super()._log_epoch_metrics(epoch, logs)


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def check_steps_per_execution(config: PretrainConfig) -> None:
    """An explicit --steps_per_execution N: --log_every and --checkpoint_every must be multiples of N,
    since Keras runs the callbacks that log, save and stop only between its calls of N steps."""
    n = config.runtime.steps_per_execution
    if not n or n == 1:
        return
    every = math.gcd(config.runtime.log_every, config.runtime.checkpoint_every)  # gcd(x, 0) == x
    for name in ("log_every", "checkpoint_every"):
        value = getattr(config.runtime, name)
        if value % n:
            raise ConfigError(
                f"--{name} {value} is not a multiple of --steps_per_execution {n} (logs, checkpoints and stops "
                f"happen between calls of {n} steps); e.g. --steps_per_execution {_largest_divisor(every, n)}"
            )


def steps_per_execution(config: PretrainConfig, strategy: tf.distribute.Strategy) -> int:
    """--steps_per_execution, or when unset ("auto"): on a TPU the largest divisor of --log_every and
    --checkpoint_every up to AUTO_TPU_STEPS_PER_EXECUTION (25 with the defaults 50 and 100), else 1
    (a CPU or GPU step is long enough that the host's call overhead does not show). Refused above 1
    with several replicas of another strategy than TPUStrategy (see below)."""
    tpu = isinstance(strategy, tf.distribute.TPUStrategy)
    if config.runtime.steps_per_execution:
        n = config.runtime.steps_per_execution
        if n > 1 and not tpu and strategy.num_replicas_in_sync > 1:
            # Seen with Keras 3.15 / TF 2.21: in Keras's multi-step loop (a tf.while_loop of tf.conds)
            # the step's cross-replica all_gather (shuffle BN, the queue) fails under
            # MirroredStrategy (wrong shapes) and MultiWorkerMirroredStrategy (unfed placeholders).
            raise ConfigError(
                f"--steps_per_execution {n} needs --strategy=tpu or a single replica: with the "
                f"{strategy.num_replicas_in_sync} replicas of {type(strategy).__name__} Keras's multi-step loop "
                "breaks the step's cross-replica gather; leave it unset (1)"
            )
        return n
    if not tpu:
        return 1
    every = math.gcd(config.runtime.log_every, config.runtime.checkpoint_every)
    return _largest_divisor(every, AUTO_TPU_STEPS_PER_EXECUTION)


def _segments(
    step: int, total: int, steps_per_epoch: int, steps_per_execution: int = 1
) -> list[tuple[int, int, int]]:
    """fit() calls (initial_epoch, epochs, steps_per_epoch) from `step` to `total`: first the
    rest of an interrupted epoch, then whole epochs, then a final partial one (--max_steps).

    With several steps per execution whose count does not divide an epoch, one call per epoch:
    Keras would run the last call of an epoch past the epoch's end (its calls are of whole
    executions), while the data of one fit() call ends where the call ends (see `_train`)."""
    out = []
    one_epoch_per_call = steps_per_epoch % steps_per_execution != 0
    while step < total:
        epoch, offset = divmod(step, steps_per_epoch)
        if offset or total - step < steps_per_epoch:
            n = min(steps_per_epoch - offset, total - step)
            out.append((epoch, epoch + 1, n))
            step += n
        else:
            whole = 1 if one_epoch_per_call else (total - step) // steps_per_epoch
            out.append((epoch, epoch + whole, steps_per_epoch))
            step += whole * steps_per_epoch
    return out


@reporting.shown_unless_configured()
def pretrain(
    config: PretrainConfig,
    progress: str = "bar",
    before_training: Callable[[str], None] | None = None,
    handle_signals: bool = False,
) -> PretrainResult:
    """The whole run: validate, build, resume if model_dir holds a checkpoint, train, save.

    progress: "bar" (Keras's interactive progress bar), "lines" (one plain line every
        `config.runtime.log_every` steps, for logs that are files) or "none"; only the chief prints.
    before_training: called on the chief with the model_dir once the run lock is held, before
        anything is built (the training command line checks --export_dir there).
    handle_signals: SIGTERM (a preemption notice) and SIGINT end the run cleanly at the end of the
        current step, saved, within `config.runtime.stop_grace_s` (StopOnSignal); handlers are
        installed for the run and the previous ones put back. The training command line asks for
        this. Without it (the default: a notebook's interrupt stays its own), Ctrl-C or an
        interrupt raises KeyboardInterrupt as usual, after the step reached is saved: calling
        pretrain again resumes there.

    What happens (resuming, kNN results, where the run is saved) is logged at INFO, and settings
    that fit the data badly at WARNING, on the "moco_tf" loggers (moco_tf.reporting). Where
    logging is not configured (no handler on "moco_tf" or above it, as in a plain script or a
    notebook), pretrain shows them for the call's duration as the command line prints them: INFO
    lines on stdout, "warning: ..." on stderr. Where it is configured, its configuration decides
    (`logging.getLogger("moco_tf").setLevel(logging.INFO)` shows the INFO lines). The progress
    of `progress` is written to stdout directly, as Keras writes its bar.

    Raises UserError (and its kinds: DataError, StrategyError, ...) for a mistake in the
    settings, RunFailed when the run cannot go on, RunInterrupted after a stop on a signal
    (handle_signals), KeyboardInterrupt after an interrupt without it.
    """
    if progress not in PROGRESS:
        raise ValueError(f"progress must be one of {', '.join(PROGRESS)}, got {progress!r}")
    config.validate()
    check_steps_per_execution(config)
    model_dir = config.runtime.model_dir or config.default_model_dir()
    # Before the strategy: a mistake found once the workers of a multi-worker run are connected
    # would look to the other workers like a lost peer.
    saved = checkpoint.read_config(model_dir)
    checkpoint.check_run_folder(model_dir, saved)  # before anything in it is moved aside or written
    if saved is not None:  # --allow_more_epochs lets --epochs grow (warm_start)
        check_same_run(warm_start.comparable(saved, config), config, model_dir)

    strategy = distribute.make_strategy(config.runtime.strategy, config.runtime.tpu, config.runtime.peer_timeout)
    chief = distribute.is_chief(strategy)
    config.check_replicas(strategy.num_replicas_in_sync)
    steps_per_execution(config, strategy)  # refused in one line before anything is written
    source = sources.make_source(config.data.dataset, config.data.data_dir, strict=config.data.strict_data)
    steps_per_epoch = config.steps_per_epoch(source.num_examples(source.pretrain_split), source.name)
    lock = None
    if chief:
        check_writable(model_dir)
        lock = runlock.RunLock(model_dir).acquire()  # released by the OS if this process dies
        if runlock.describe_previous(lock):
            log.info(runlock.describe_previous(lock))
    try:
        if chief and before_training is not None:
            before_training(model_dir)
        if chief:  # before the first step, after every check of the user's input: settings that fit the data badly
            for warning in guardrails.recipe_warnings(config, source.num_examples(source.pretrain_split)):
                log.warning(warning)
        return _train(config, saved, model_dir, strategy, chief, source, steps_per_epoch,
                      progress if chief else "none", handle_signals)
    finally:
        if lock is not None:
            lock.release()


def _color_in_step(config: PretrainConfig, strategy: tf.distribute.Strategy) -> bool:
    """Whether the train step runs the colour stage (--color_stage; auto: where it has an accelerator)."""
    if config.runtime.color_stage == "auto":
        return distribute.has_accelerator(strategy)
    return config.runtime.color_stage == "device"


def _train(
    config: PretrainConfig, saved: PretrainConfig | None, model_dir: str, strategy, chief: bool,
    source: sources.Source, steps_per_epoch: int, progress: str, handle_signals: bool = False,
) -> PretrainResult:
    run_ckpt_dir = os.path.join(model_dir, checkpoint_files.CHECKPOINT_DIR)
    if chief:
        for path in checkpoint.remove_leftovers(run_ckpt_dir, model_dir):
            log.info(f"removed {path}, left by an interrupted run")
    latest = checkpoint_files.newest_intact(run_ckpt_dir, log=log.info if chief else None, repair=chief)
    if saved is None and latest is not None:
        raise checkpoint_files.CheckpointError(
            f"{model_dir} holds checkpoints but no {checkpoint.CONFIG_FILE}; restore it"
        )

    if config.runtime.seed is not None:
        keras.utils.set_random_seed(config.runtime.seed)
    if config.runtime.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(PRECISION_POLICIES[config.runtime.mixed_precision])

    with strategy.scope():
        model = checkpoint.build_model(config, color_in_step=_color_in_step(config, strategy))
        optim = config.optim
        schedule = EpochSchedule(
            scaled_lr(optim.lr, optim.batch_size), steps_per_epoch, optim.epochs, optim.schedule,
            optim.milestones, optim.warmup_epochs,
        )
        optimizer = SGD(schedule, momentum=config.optim.sgd_momentum, weight_decay=config.optim.weight_decay)
        per_call = steps_per_execution(config, strategy)
        model.compile(optimizer=optimizer, jit_compile=config.runtime.jit_compile, steps_per_execution=per_call)
        epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        # The data order's seed is part of the checkpoint, so a resumed run continues the same stream.
        # Created in scope: multi-worker strategies give every worker the chief's initial value.
        data_seed = tf.Variable(
            config.runtime.seed if config.runtime.seed is not None else random.SystemRandom().randrange(2**31),
            dtype=tf.int64, trainable=False, name="data_seed",
        )
        ckpt = checkpoint.make_checkpoint(model, optimizer, epoch, data_seed=data_seed)

    ckpt_dir = checkpoint.worker_checkpoint_dir(model_dir, chief)
    manager = checkpoint.manager(ckpt, ckpt_dir, config.runtime.keep_checkpoints)
    if latest:
        checkpoint_files.restore_matching(ckpt, latest, f"the run {model_dir}/{checkpoint.CONFIG_FILE} describes")
        log.info(f"resuming {model_dir} from step {int(optimizer.iterations.numpy())} (epoch {int(epoch.numpy())})")
        if config.runtime.init_from:
            log.info(f"--init_from is read at step 0 only: the weights are the checkpoint's, not those of "
                     f"{config.runtime.init_from}")
        extended = warm_start.extension(saved, config)
        if extended and chief:
            step_now = int(optimizer.iterations.numpy())
            log.info(f"extending {model_dir} from {extended[0]} to {extended[1]} epochs at step {step_now}: "
                     f"the {config.optim.schedule} schedule now runs over {extended[1]} epochs")
            checkpoint.write_config(model_dir, warm_start.extended_config(saved, config, step_now))
    else:
        if config.runtime.init_from:
            config = warm_start.initialise(model, config)  # reads --init_from (moco_tf.weights)
        if chief:
            checkpoint.write_config(model_dir, config)

    step = int(optimizer.iterations.numpy())
    distribute.check_same_on_all_workers(
        strategy, step, "the step restored from --model_dir", "--model_dir must be one folder every worker reads"
    )
    total = config.total_steps(steps_per_epoch)
    log_dir = os.path.join(model_dir, "logs")
    seed = int(data_seed.numpy())

    stop = StopOnSignal(config.runtime.stop_grace_s)
    # Order matters: the loss guard runs before anything saves the step it rejects.
    callbacks: list[keras.callbacks.Callback] = [StopOnNonFiniteLoss(manager), stop]
    if config.runtime.knn_every and source.num_classes and source.eval_split:
        eval_batch = max(config.optim.batch_size, 64)
        train_ds = pipelines.labelled_dataset(source, source.train_split, config.data.image_size, eval_batch)
        val_ds = pipelines.labelled_dataset(source, source.eval_split, config.data.image_size, eval_batch)
        monitor = knn.KNNMonitor(
            train_ds, val_ds, config.runtime.knn_every, log_dir=log_dir if chief else None, k=config.runtime.knn_k,
            t=config.runtime.knn_t, num_classes=source.num_classes, class_names=source.class_names,
            final_epoch=config.optim.epochs,
        )
        callbacks.append(monitor)
        if step == 0 and chief:
            before = knn.evaluate(
                model.backbone_q, train_ds, val_ds, config.runtime.knn_k, config.runtime.knn_t, source.num_classes
            )
            log.info(f"kNN top-1 before training: {before.top1:.2f}%")
    callbacks.append(TrainingLogs(schedule, config.optim.batch_size, config.optim.epochs, print_summary=chief))
    if source.kind == "files":  # folders are only listed at start: report files that did not decode
        callbacks.append(data_health.UndecodableFilesReport(
            source.undecodable, log_dir if chief else None, log.info if chief else lambda line: None
        ))
    if progress == "lines":
        callbacks.append(StepLines(schedule, config.optim.batch_size, config.runtime.log_every, total))
    saver = CheckpointEvery(manager, epoch, config.runtime.checkpoint_every, steps_per_epoch, stop)
    callbacks.append(saver)
    if chief:
        callbacks.append(_TensorBoard(log_dir, update_freq=config.runtime.log_every, write_graph=False))
        if step == 0:
            _write_view_pairs(source, log_dir, config, seed)

    history = {}
    started = step
    if handle_signals:
        stop.install()
    try:
        for initial_epoch, epochs, steps in _segments(step, total, steps_per_epoch, per_call):
            # A new stream for each fit() call, positioned at the step it starts from (segments are
            # contiguous, so that is the current step): fit restarts whatever iterator it is given.
            # With several steps per call the stream ends with the segment, so that a call that would
            # pass it (a resume or an epoch that is no multiple of the call) stops there instead.
            dataset = distribute.per_host_dataset(
                strategy,
                lambda context, start=step, length=(epochs - initial_epoch) * steps: pipelines.pretrain_dataset(
                    source, source.pretrain_split, config.data.image_size, config.data.aug, optim.batch_size, seed,
                    context, start_step=start, views=config.data.view_options(),
                    color_in_step=model.color_in_step,
                ).take(length if per_call > 1 else -1)
            )
            result = model.fit(
                dataset, initial_epoch=initial_epoch, epochs=epochs, steps_per_epoch=steps,
                callbacks=callbacks, verbose=1 if progress == "bar" else 0, shuffle=False,
            )
            history = result.history
            step = int(optimizer.iterations.numpy())
            if stop.requested:
                break
    except KeyboardInterrupt:
        # No handlers of ours (a notebook's interrupt, Ctrl-C in a script): the interrupt lands
        # between steps (a step runs in TensorFlow, out of Python's reach), so the weights are
        # those of the optimizer's step; save them, then let the interrupt go on as the caller's.
        # A second interrupt during the save leaves the previous checkpoint the newest.
        reached = int(optimizer.iterations.numpy())
        if reached > started:
            saver.save()
            if chief:
                log.info(f"interrupted at step {reached}: checkpoint saved in {model_dir}; "
                         "call pretrain again to resume")
        raise
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
        log.info(f"{model_dir} already holds {step} steps of {total}: nothing to train")

    if chief and "knn_top1" in history:
        log.info(f"kNN top-1 after training: {history['knn_top1'][-1]:.2f}%")
    if chief:
        log.info(f"checkpoints and TensorBoard logs in {model_dir}")
    return PretrainResult(model, history, model_dir, chief, int(epoch.numpy()))
