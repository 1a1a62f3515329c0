"""Finding, verifying and repairing a folder's checkpoints: what train's resume does, shared with
the evaluation runs (lincls, finetune), whose layer (moco_tf.evaluation) sits below training.

The checkpoint files are listed from disk (the `checkpoint` record is not trusted alone), the
newest one is read through before it is used, and a broken one is named, and moved aside only by
a caller that owns the folder."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable

import tensorflow as tf

from moco_tf.atomic_write import reason
from moco_tf.errors import UserError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
BROKEN_DIR = "broken"  # where unreadable checkpoints are moved, inside the checkpoints' folder


class CheckpointError(UserError):
    """A model_dir's config or checkpoints cannot be used or written; the message says which file."""


_CKPT_FILE = re.compile(r"^ckpt-(\d+)\.(index|data-\d+-of-\d+)$")
CKPT_TEMP = re.compile(r"^ckpt-\d+_temp$")


def warn(message: str) -> None:
    log.warning(message)


def checkpoint_files(ckpt_dir: str) -> dict[int, list[str]]:
    """step -> the ckpt-STEP.* files on disk (index and data), whatever the `checkpoint` record says."""
    found: dict[int, list[str]] = {}
    if not tf.io.gfile.isdir(ckpt_dir):
        return found
    for name in tf.io.gfile.listdir(ckpt_dir):
        match = _CKPT_FILE.match(name)
        if match:
            found.setdefault(int(match.group(1)), []).append(name)
    return found


def unreadable(prefix: str) -> str | None:
    """Why the checkpoint at `prefix` cannot be restored (reads every tensor), or None if it can."""
    try:
        reader = tf.train.load_checkpoint(prefix)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except Exception as error:  # noqa: BLE001 - TF raises IndexError, DataLossError, NotFoundError, ...
        return reason(error)
    return None


def newest_intact(ckpt_dir: str, log: Callable[[str], None] | None = None, repair: bool = False) -> str | None:
    """The prefix of the newest checkpoint in ckpt_dir that reads through, or None when there are no
    checkpoint files at all. Broken newer ones are reported by file name (through `log`); with
    `repair` (the one process that owns the run) they are moved into ckpt_dir/broken/ and the
    `checkpoint` record is rewritten to the intact ones, so CheckpointManager keeps counting right.

    Raises CheckpointError when checkpoint files exist but none is readable: starting at step 0 over
    them would silently lose the run."""
    files = checkpoint_files(ckpt_dir)
    broken, intact = [], []
    for step in sorted(files, reverse=True):
        prefix = os.path.join(ckpt_dir, f"ckpt-{step}")
        if f"ckpt-{step}.index" not in files[step]:
            problem = "no .index file (interrupted while being written)"
        else:
            problem = unreadable(prefix) if not intact else None  # older ones are not needed to start
        if problem:
            broken.append(step)
            if log:
                log(f"checkpoint {prefix} is unreadable ({problem}); using the previous one")
        else:
            intact.append(prefix)
    if files and not intact:
        raise CheckpointError(
            f"{ckpt_dir} holds checkpoint files but none is readable; refusing to start over at step 0 "
            f"(move the folder away to start a new run)"
        )
    if repair and (broken or intact):
        aside = os.path.join(ckpt_dir, BROKEN_DIR)
        for step in broken:
            tf.io.gfile.makedirs(aside)
            for name in files[step]:
                tf.io.gfile.rename(os.path.join(ckpt_dir, name), os.path.join(aside, name), overwrite=True)
        # Relative names, oldest first, as CheckpointManager writes the record (written atomically);
        # rewritten only when it does not list exactly the intact checkpoints.
        names = [os.path.basename(p) for p in intact]
        state = tf.train.get_checkpoint_state(ckpt_dir)
        recorded = [os.path.basename(p) for p in state.all_model_checkpoint_paths] if state else []
        if recorded != names[::-1] or os.path.basename(state.model_checkpoint_path) != names[0]:
            tf.compat.v1.train.update_checkpoint_state(ckpt_dir, names[0], all_model_checkpoint_paths=names[::-1])
    return intact[0] if intact else None


def restore_matching(checkpoint: tf.train.Checkpoint, prefix: str, what: str) -> None:
    """Restore `prefix` into `checkpoint`, every variable of its objects included; a checkpoint that
    leaves one unrestored (another network's, another project's beside a moco_tf config) is a
    CheckpointError in one line instead of weights left at their initial values. Values the
    checkpoint holds beyond the objects (an optimizer a reader does not need) are fine."""
    status = checkpoint.restore(prefix)
    status.expect_partial()  # no "unrestored values" warnings from TensorFlow after the one line
    try:
        status.assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        first = first.split(", likely due to")[0].split(". Showing")[0]  # TF's sentence, not its object list
        raise CheckpointError(f"checkpoint {prefix} does not fit {what} ({first[:160]}); is it moco_tf's?") from None
