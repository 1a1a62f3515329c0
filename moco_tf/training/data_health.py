"""Reports the image files a run could not decode: one line and a TensorBoard scalar.

Image folders are only listed at start (moco_tf.data.sources); a file that turns out not to
decode is replaced in pretraining, left out of kNN, and recorded in `Source.undecodable`. This
callback turns that record into one summary line at the end of an epoch (when it grew) and of
the run, and the scalar `data/undecodable_files` (distinct files so far) in TensorBoard. The
pipelines run ahead of training, so a count may include files of the next few batches.
With several workers each records the files of its own shard; the chief reports its own.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import keras
import tensorflow as tf

from moco_tf.data.sources import UndecodableFiles

SCALAR = "data/undecodable_files"


class UndecodableFilesReport(keras.callbacks.Callback):
    """Reports `undecodable.summary()` through `log` (default: an INFO record) when it changed,
    and writes its count to `log_dir`/data."""

    def __init__(
        self, undecodable: UndecodableFiles, log_dir: str | None, log: Callable[[str], None] | None = None
    ):
        super().__init__()
        self.undecodable = undecodable
        self.log_dir = log_dir
        self.log = log or logging.getLogger(__name__).info
        self.reported = 0
        self._writer = None

    def _report(self) -> None:
        count = len(self.undecodable)
        if self.log_dir:
            if self._writer is None:
                self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "data"))
            step = int(self.model.optimizer.iterations.numpy()) if self.model is not None else 0
            # record_if: Keras's TensorBoard callback leaves a condition on its own update_freq set.
            with self._writer.as_default(), tf.summary.record_if(True):
                tf.summary.scalar(SCALAR, count, step=step)
            self._writer.flush()
        if count > self.reported:
            self.log(self.undecodable.summary())
            self.reported = count

    def on_epoch_end(self, epoch, logs=None) -> None:
        self._report()

    def on_train_end(self, logs=None) -> None:
        # A run stopped mid-epoch (a signal) still reports what it met.
        if len(self.undecodable) > self.reported:
            self._report()
