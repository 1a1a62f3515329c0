"""Keras callbacks of the training CLI: checkpoints, throughput, learning rate, epoch summary."""

from __future__ import annotations

import time

import keras
import tensorflow as tf


class CheckpointEvery(keras.callbacks.Callback):
    """Saves through a CheckpointManager every `every` steps and at each epoch end.

    The epoch variable counts finished epochs, so a resumed run knows where it stands."""

    def __init__(self, manager: tf.train.CheckpointManager, epoch: tf.Variable, every: int):
        super().__init__()
        self.manager, self.epoch, self.every = manager, epoch, every
        self._last_saved = None

    def _save(self):
        step = int(self.model.optimizer.iterations.numpy())
        if step != self._last_saved:
            self.manager.save(checkpoint_number=step)
            self._last_saved = step

    def on_train_batch_end(self, batch, logs=None):
        if self.every and int(self.model.optimizer.iterations.numpy()) % self.every == 0:
            self._save()

    def on_epoch_end(self, epoch, logs=None):
        self.epoch.assign(epoch + 1)
        self._save()


class TrainingLogs(keras.callbacks.Callback):
    """Adds `lr` and `img_per_s` to the logs (progress bar, TensorBoard) and prints one line per epoch."""

    def __init__(self, schedule, global_batch_size: int, epochs: int, print_summary: bool = True):
        super().__init__()
        self.schedule, self.batch, self.epochs = schedule, global_batch_size, epochs
        self.print_summary = print_summary

    def _lr(self) -> float:
        # The rate of the epoch's last step (iterations already counts it).
        return float(self.schedule(self.model.optimizer.iterations - 1))

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._steps = time.perf_counter(), 0

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1
        if logs is not None:
            logs["img_per_s"] = self._steps * self.batch / max(time.perf_counter() - self._start, 1e-9)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        logs["lr"] = self._lr()
        logs["img_per_s"] = self._steps * self.batch / max(time.perf_counter() - self._start, 1e-9)
        if self.print_summary:
            parts = [f"epoch {epoch + 1}/{self.epochs}", f"step {int(self.model.optimizer.iterations.numpy())}"]
            for key in ("loss", "acc", "logit_pos", "logit_neg", "knn_top1", "lr", "img_per_s"):
                if key in logs:
                    parts.append(f"{key} {float(logs[key]):.4g}")
            print(" | ".join(parts), flush=True)
