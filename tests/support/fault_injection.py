"""Runs `python -m moco_tf.train` with one fault injected: a SIGKILL (or SIGTERM) at a named point.

    python tests/support/fault_injection.py POINT N [train flags...]

kills the process at the N-th time POINT is reached. The points are real moments of a run: the
test (tests/test_run_kill_resume.py) reruns the same command afterwards and checks that nothing was
lost beyond the last checkpoint and nothing half-written was taken for whole.
"""

import os
import signal
import sys
import threading
import time


def _kill(sig=signal.SIGKILL):
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), sig)
    if sig == signal.SIGKILL:
        time.sleep(60)  # never reached


def _counting(original, n, before=None, after=None):
    """Wrap `original`: at its n-th call run `before()` ahead of it (and `after()` once it returns)."""
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        hit = calls[0] == n
        if hit and before:
            before()
        result = original(*args, **kwargs)
        if hit and after:
            after()
        return result

    return wrapper


def _watch(directory, condition, timeout=30.0):
    """Kill the process from a thread as soon as `condition(names in directory)` holds."""

    def run():
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                names = os.listdir(directory)
            except FileNotFoundError:
                names = []
            if condition(names):
                _kill()
            time.sleep(0.0002)

    threading.Thread(target=run, daemon=True).start()


def install(point: str, n: int, model_dir: str) -> None:
    import keras
    import tensorflow as tf
    from tensorflow.python.checkpoint import checkpoint_management

    from moco_tf.interop import hub
    from moco_tf.training import callbacks, checkpoint_files, pretrain, runlock

    ckpt_dir = os.path.join(model_dir, checkpoint_files.CHECKPOINT_DIR)
    if point == "lock":  # right after taking the run lock
        runlock.RunLock.acquire = _counting(runlock.RunLock.acquire, n, after=_kill)
    elif point == "config_rename":  # config.json's temporary file written, not yet renamed
        original_replace, calls = os.replace, [0]

        def replace(src, dst, *args, **kwargs):
            if os.path.basename(dst) == "config.json":
                calls[0] += 1
                if calls[0] == n:
                    _kill()
            return original_replace(src, dst, *args, **kwargs)

        os.replace = replace
    elif point == "view_pairs":  # writing the TensorBoard picture of the views
        pretrain._write_view_pairs = _counting(pretrain._write_view_pairs, n, before=_kill)
    elif point in ("step_begin", "step_mid", "sigterm_at_step", "sigterm_then_kill"):
        def begin(self, batch, logs=None, calls=[0]):  # noqa: B006 - a counter shared by the calls
            calls[0] += 1
            if calls[0] != n:
                return
            if point == "step_begin":
                _kill()
            elif point == "step_mid":  # while the step's ops run
                threading.Timer(0.05, _kill).start()
            else:
                os.kill(os.getpid(), signal.SIGTERM)
                if point == "sigterm_then_kill":  # and die inside the save that follows
                    original = tf.train.CheckpointManager.save
                    tf.train.CheckpointManager.save = _counting(original, 1, before=_kill)

        callbacks.TrainingLogs.on_train_batch_begin = begin
    elif point == "epoch_end":  # at the end of an epoch, before its checkpoint
        callbacks.TrainingLogs.on_epoch_end = _counting(callbacks.TrainingLogs.on_epoch_end, n, before=_kill)
    elif point == "save_begin":  # a checkpoint save about to start
        tf.train.CheckpointManager.save = _counting(tf.train.CheckpointManager.save, n, before=_kill)
    elif point in ("save_temp", "save_data_no_index"):  # inside TF's write, seen from a watching thread
        def start_watch():
            if point == "save_temp":
                _watch(ckpt_dir, lambda names: any(name.endswith("_temp") for name in names))
            else:
                def data_without_index(names):
                    data = {name.split(".data-")[0] for name in names if ".data-" in name}
                    index = {name[: -len(".index")] for name in names if name.endswith(".index")}
                    return bool(data - index)

                _watch(ckpt_dir, data_without_index)

        # Under load the watcher may miss the moment: then the kill comes right after the write.
        tf.train.CheckpointManager.save = _counting(tf.train.CheckpointManager.save, n, before=start_watch, after=_kill)
    elif point == "save_record":  # data and index written, `checkpoint` record not yet updated
        checkpoint_management.update_checkpoint_state_internal = _counting(
            checkpoint_management.update_checkpoint_state_internal, n, before=_kill
        )
    elif point == "delete_old":  # while the manager deletes a checkpoint beyond --keep_checkpoints
        checkpoint_management._delete_file_if_exists = _counting(
            checkpoint_management._delete_file_if_exists, n, after=_kill
        )
    elif point == "export_save":  # inside the SavedModel write of the export
        tf.saved_model.save = _counting(tf.saved_model.save, n, before=_kill)
    elif point == "export_rename":  # the n-th rename of the export (an overwrite's renames)
        original_rename = os.rename
        os.rename = _counting(original_rename, n, before=_kill)
        hub.os.rename = os.rename
    else:
        raise SystemExit(f"unknown fault point {point}")
    del keras


def main() -> None:
    point, n, *flags = sys.argv[1:]
    model_dir = next(f.split("=", 1)[1] for f in flags if f.startswith("--model_dir="))
    install(point, int(n), model_dir)
    from moco_tf import train

    sys.argv = ["moco_tf.train", *flags]
    train.run()


if __name__ == "__main__":
    main()
