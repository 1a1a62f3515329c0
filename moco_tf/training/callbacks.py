"""Keras callbacks of a pretraining run: checkpoints, clean stops (signals, divergence), throughput,
learning rate, the epoch summary, and plain progress lines for logs that are files.

With `steps_per_execution` N > 1 Keras calls the batch hooks once per call of N steps (fewer at the
end of a fit() call), so everything here reads the step from the optimizer, never counts hook calls,
and a line or checkpoint due every K steps is done at the end of the call that reaches or passes a
multiple of K (exactly at it when the calls are aligned: K a multiple of N and an epoch a multiple
of N, or the run in one fit() call).

The epoch summary and the per-step lines are progress output, like Keras's bar: written to stdout
by the callback itself (the caller chose them with pretrain's `progress`), not logged. The notices
of a stop on a signal are log records (moco_tf.reporting).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import keras
import numpy as np
import tensorflow as tf

from moco_tf.atomic_write import is_disk_full
from moco_tf.errors import RunFailed
from moco_tf.reporting import AS_IS

log = logging.getLogger(__name__)


class StopOnSignal(keras.callbacks.Callback):
    """SIGTERM (the preemption notice on GCE / TPU VMs) and SIGINT (Ctrl-C) end the run cleanly: the
    step in progress finishes, CheckpointEvery saves it, and fit returns.

    A second signal, or `grace_s` seconds without reaching the end of a step, exits at once (the
    last checkpoint stays the newest): stopping never takes longer than that."""

    def __init__(self, grace_s: float = 120.0):
        super().__init__()
        self.grace_s = grace_s
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def install(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received is not None:  # a second signal: leave now
            os._exit(128 + signum)
        self.received = signum
        log.warning(f"{signal.Signals(signum).name} received: saving a checkpoint after the current step "
                    f"(at most {self.grace_s:.0f} s; send it again to exit now)", extra=AS_IS)
        timer = threading.Timer(self.grace_s, self._give_up, args=(signum,))
        timer.daemon = True
        timer.start()

    def _give_up(self, signum: int) -> None:
        log.error(f"no step ended within {self.grace_s:.0f} s of {signal.Signals(signum).name}; exiting without "
                  "a new checkpoint (the previous one is intact)")
        os._exit(128 + signum)

    def on_train_batch_end(self, batch, logs=None):
        from moco_tf.training.distribute import any_worker

        # Every worker must stop at the same step: one stopping alone runs other collectives
        # (its save) than the rest, and all of them fail. A worker told by another adopts SIGTERM.
        if any_worker(self.model.distribute_strategy, self.requested):
            if self.received is None:
                self.received = signal.SIGTERM
                self.by_peer = True
            self.model.stop_training = True

    by_peer = False  # stopping because another worker of a multi-worker run got the signal


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stops at the first step whose loss is NaN or infinite, before anything saves that step."""

    def __init__(self, manager: tf.train.CheckpointManager):
        super().__init__()
        self.manager = manager

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.all(np.isfinite(np.asarray(loss))):
            step = int(self.model.optimizer.iterations.numpy())
            raise RunFailed(
                f"the loss became {float(np.asarray(loss).reshape(-1)[0])} at step {step}; stopped without saving "
                f"it ({_newest(self.manager)}); this recipe diverges: start a new --model_dir with a lower --lr"
            )


def passed_multiple(before: int, after: int, every: int) -> bool:
    """Whether the steps (before, after] hold a multiple of `every` (0: never)."""
    return bool(every) and after // every > before // every


def _newest(manager: tf.train.CheckpointManager) -> str:
    latest = manager.latest_checkpoint
    return f"the newest checkpoint, {latest}, is intact" if latest else "no checkpoint was written"


class CheckpointEvery(keras.callbacks.Callback):
    """Saves through a CheckpointManager every `every` steps, at each epoch's last step, when a stop is
    requested, and when training ends.

    The epoch variable counts finished epochs (step // steps_per_epoch), so a resumed run knows where
    it stands. Non-finite weights are never saved; a full disk ends the run with one line and the
    previous checkpoint intact (TF writes a checkpoint to temporary files first)."""

    def __init__(
        self, manager: tf.train.CheckpointManager, epoch: tf.Variable, every: int, steps_per_epoch: int,
        stop: StopOnSignal | None = None,
    ):
        super().__init__()
        self.manager, self.epoch, self.every, self.steps_per_epoch = manager, epoch, every, steps_per_epoch
        self.stop = stop
        self._last_saved = None
        self._step = 0  # the step at the previous hook call

    def on_train_begin(self, logs=None):
        self._step = int(self.model.optimizer.iterations.numpy())

    def save(self) -> None:
        step = int(self.model.optimizer.iterations.numpy())
        if step == self._last_saved:
            return
        for weight in self.model.weights:
            if not np.all(np.isfinite(np.asarray(weight))):
                raise RunFailed(
                    f"{weight.path} became non-finite at step {step}; stopped without saving it "
                    f"({_newest(self.manager)}); start a new --model_dir with a lower --lr"
                )
        self.epoch.assign(step // self.steps_per_epoch)
        try:
            self.manager.save(checkpoint_number=step)
        except (OSError, tf.errors.OpError) as error:
            if not is_disk_full(error):
                raise
            raise RunFailed(
                f"no space left on device while writing the checkpoint of step {step} in {self.manager.directory}; "
                f"{_newest(self.manager)}: free some space and rerun to resume"
            ) from None
        self._last_saved = step

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        before, self._step = self._step, step
        due = passed_multiple(before, step, self.every) or passed_multiple(before, step, self.steps_per_epoch)
        if due or (self.stop is not None and self.stop.requested):
            self.save()

    def on_train_end(self, logs=None):
        self.save()  # a run cut short by --max_steps keeps its last steps


class TrainingLogs(keras.callbacks.Callback):
    """Adds `lr` and `img_per_s` to the logs (progress bar, TensorBoard) and prints one line per epoch."""

    def __init__(self, schedule, global_batch_size: int, epochs: int, print_summary: bool = True):
        super().__init__()
        self.schedule, self.batch, self.epochs = schedule, global_batch_size, epochs
        self.print_summary = print_summary

    def _lr(self) -> float:
        # The rate of the epoch's last step (iterations already counts it).
        return float(self.schedule(self.model.optimizer.iterations - 1))

    def _steps(self) -> int:  # steps since the epoch began (hooks run once per call of N steps)
        return int(self.model.optimizer.iterations.numpy()) - self._first

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._first = time.perf_counter(), int(self.model.optimizer.iterations.numpy())

    def on_train_batch_end(self, batch, logs=None):
        if logs is not None:
            logs["img_per_s"] = self._steps() * self.batch / max(time.perf_counter() - self._start, 1e-9)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        logs["lr"] = self._lr()
        logs["img_per_s"] = self._steps() * self.batch / max(time.perf_counter() - self._start, 1e-9)
        if self.print_summary:
            parts = [f"epoch {epoch + 1}/{self.epochs}", f"step {int(self.model.optimizer.iterations.numpy())}"]
            for key in ("loss", "acc", "logit_pos", "logit_neg", "self_neg", "knn_top1", "lr", "img_per_s"):
                if key in logs:
                    parts.append(f"{key} {float(logs[key]):.4g}")
            print(" | ".join(parts), flush=True)


class StepLines(keras.callbacks.Callback):
    """One plain line every `every` steps (step, loss, acc, logits, self_neg, lr, images per second), for
    output that is a file: Keras's progress bar redraws itself with carriage returns and colours,
    which a log file keeps as one unreadable line per epoch. Use with `fit(verbose=0)`."""

    # self_neg: share of the queries whose own image has keys in the queue (absent without image ids).
    KEYS = ("loss", "acc", "logit_pos", "logit_neg", "self_neg")

    def __init__(self, schedule, global_batch_size: int, every: int, total_steps: int):
        super().__init__()
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.schedule, self.batch, self.every, self.total = schedule, global_batch_size, every, total_steps
        self._start, self._first, self._step = None, 0, 0

    def on_train_begin(self, logs=None):
        self._step = int(self.model.optimizer.iterations.numpy())
        self._start = None

    def on_train_batch_begin(self, batch, logs=None):
        if self._start is None:  # throughput over the steps since the last line
            self._start, self._first = time.perf_counter(), self._step

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        before, self._step = self._step, step
        if not passed_multiple(before, step, self.every):
            return
        logs = logs or {}
        parts = [f"step {step}/{self.total}"]
        for key in self.KEYS:
            if key in logs:
                parts.append(f"{key} {float(np.asarray(logs[key]).reshape(-1)[0]):.4g}")
        parts.append(f"lr {float(self.schedule(step - 1)):.4g}")  # the rate of the step just taken
        seconds = max(time.perf_counter() - self._start, 1e-9)
        parts.append(f"img_per_s {(step - self._first) * self.batch / seconds:.4g}")
        print(" | ".join(parts), flush=True)
        self._start = None
