"""Reliability of a run under kills: SIGKILL at 20 points of real runs (inside steps, inside checkpoint
writes, between a checkpoint's files, inside exports and an export's overwrite), each followed by a
rerun of the same command; and exact resume. The reference is an uninterrupted run of the same
seeded, deterministic recipe: the chain of killed runs must end with the same weights, BN
statistics, queue and optimizer slots."""

import os
import shutil
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import tensorflow as tf

from tests.support.helpers import ENV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = [
    "--flagfile=configs/quickstart.flags", "--batch_size=32", "--queue_size=64", "--bn_groups=2",
    "--steps_per_epoch=3", "--epochs=5", "--knn_every=0", "--checkpoint_every=1", "--keep_checkpoints=2",
    "--seed=3", "--deterministic", "--width=8", "--export_dir=",
]
TOTAL_STEPS = 15
# Not part of the run's state: how many saves the Checkpoint object made in this process.
_BOOKKEEPING = ("save_counter", "_CHECKPOINTABLE_OBJECT_GRAPH")


def _train(model_dir, export_dir=None, *extra, fault=None):
    flags = [*RUN, f"--model_dir={model_dir}", *([f"--export_dir={export_dir}"] if export_dir else []), *extra]
    command = [sys.executable, "-m", "moco_tf.train", *flags]
    if fault:
        command = [sys.executable, os.path.join(ROOT, "tests", "support", "fault_injection.py"), *fault, *flags]
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def _newest(model_dir):
    from moco_tf.training import checkpoint_files

    return checkpoint_files.newest_intact(os.path.join(model_dir, checkpoint_files.CHECKPOINT_DIR))


def _state(model_dir):
    reader = tf.train.load_checkpoint(_newest(model_dir))
    return {
        name: reader.get_tensor(name)
        for name in reader.get_variable_to_shape_map()
        if not name.startswith(_BOOKKEEPING)
    }


def _step(model_dir):
    prefix = _newest(model_dir)
    return int(prefix.rsplit("-", 1)[1]) if prefix else 0


def _assert_same_state(got, want):
    assert sorted(got) == sorted(want)
    worst = max(float(np.max(np.abs(got[k].astype(np.float64) - want[k]))) for k in want if want[k].size)
    assert worst <= 1e-6, worst
    return worst


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("reference") / "run")
    result = _train(model_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _step(model_dir) == TOTAL_STEPS
    return {"model_dir": model_dir, "state": _state(model_dir)}


def test_stopped_and_resumed_run_equals_uninterrupted(reference, tmp_path):
    model_dir = str(tmp_path / "run")
    first = _train(model_dir, None, "--max_steps=4")  # stops inside the second epoch
    assert first.returncode == 0, first.stderr[-3000:]
    second = _train(model_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "from step 4" in second.stdout
    worst = _assert_same_state(_state(model_dir), reference["state"])
    print(f"max abs difference resumed vs uninterrupted: {worst:.3g}")


# (point, n): kill at the n-th time the point is reached in that process. In run order: each
# rerun continues the same model_dir from whatever the previous kill left.
KILLS = [
    ("lock", 1),  # a stale lock of a dead run
    ("config_rename", 1),  # config.json's temporary file written, not renamed
    ("view_pairs", 1),
    ("step_mid", 1),  # inside the first step's ops
    ("save_begin", 2),
    ("save_temp", 1),  # inside TF's checkpoint write (ckpt-N_temp/ on disk)
    ("save_record", 1),  # data and index written, `checkpoint` record not updated
    ("save_data_no_index", 1),  # between the data file and the index
    ("delete_old", 1),  # half-way through deleting a checkpoint beyond --keep_checkpoints
    ("step_begin", 2),
    ("epoch_end", 1),
    ("sigterm_then_kill", 1),  # killed inside the save a SIGTERM asked for
    ("step_mid", 2),
    ("save_temp", 2),
    ("save_begin", 1),
    ("step_begin", 1),
]
EXPORT_KILLS = [
    ("export_save", 1),  # inside the SavedModel write of an overwrite
    ("export_rename", 1),  # an overwrite's first rename
    ("export_rename", 2),  # an overwrite's second rename
    ("export_save", 1),
]


def _is_export(path):
    return os.path.exists(os.path.join(path, "saved_model.pb")) and os.path.exists(
        os.path.join(path, "assets", "moco_config.json")
    )


def _kill_chain(kills, model_dir, export_dir):
    """`kills` in order on one model_dir, then a SIGTERM, then the run to its end."""
    steps = [0]
    for point, n in kills:
        result = _train(model_dir, export_dir, fault=(point, str(n)))
        assert result.returncode == -signal.SIGKILL, (point, n, result.returncode, result.stderr[-3000:])
        steps.append(_step(model_dir))
        assert steps[-1] >= steps[-2], (point, steps)  # nothing lost beyond the last checkpoint
        assert steps[-1] < TOTAL_STEPS, (point, steps)
    # A SIGTERM (preemption notice) saves the current step and exits 143 with one line.
    stopped = _train(model_dir, export_dir, fault=("sigterm_at_step", "1"))
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "stopped by SIGTERM" in stopped.stderr and "Traceback" not in stopped.stderr
    assert _step(model_dir) == steps[-1] + 1
    finished = _train(model_dir, export_dir)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert _is_export(export_dir)


def _export_kill_chain(model_dir, export_dir):
    """Reruns of a finished run: only its export is redone, and killed inside it. Each start first
    puts back an export that the previous kill left moved aside in the middle of a replacement."""
    first = _train(model_dir, export_dir)
    assert first.returncode == 0 and "nothing to train" in first.stdout, first.stderr[-3000:]
    parent = os.path.dirname(export_dir)
    for point, n in EXPORT_KILLS:
        result = _train(model_dir, export_dir, fault=(point, str(n)))
        assert result.returncode == -signal.SIGKILL, (point, n, result.returncode, result.stderr[-3000:])
        # Never lost: a complete export is in place, or (killed between an overwrite's renames)
        # the previous one lies complete in our staging folder, for the next start to put back.
        staged = [os.path.join(parent, name, "old") for name in os.listdir(parent) if name.endswith(".tmp")]
        assert _is_export(export_dir) or any(_is_export(path) for path in staged), (point, n, os.listdir(parent))
    last = _train(model_dir, export_dir)
    assert last.returncode == 0, last.stderr[-3000:]
    assert _is_export(export_dir)


def test_killed_at_20_points_and_rerun_loses_nothing(reference, tmp_path):
    # Three chains side by side (the machine has two cores; each process mostly starts up): the
    # training kills in two halves, each on a fresh model_dir, and the export kills on a copy of
    # the reference run.
    half = len(KILLS) // 2
    runs = [(str(tmp_path / f"run{i}"), str(tmp_path / f"export{i}")) for i in range(2)]
    done_dir, done_export = str(tmp_path / "done" / "run"), str(tmp_path / "done" / "export")
    shutil.copytree(reference["model_dir"], done_dir)
    errors = []

    def chain(function, *args):
        try:
            function(*args)
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=chain, args=(_kill_chain, KILLS[:half], *runs[0])),
               threading.Thread(target=chain, args=(_kill_chain, KILLS[half:], *runs[1])),
               threading.Thread(target=chain, args=(_export_kill_chain, done_dir, done_export))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]

    # No leftovers of the kills once a run has started again; both chains end where an uninterrupted run does.
    for model_dir, _ in runs:
        leftovers = [
            name
            for folder in (os.path.join(model_dir, "checkpoints"), str(tmp_path), str(tmp_path / "done"))
            for name in os.listdir(folder)
            if name.endswith(("_temp", ".tmp", ".old"))
        ]
        assert not leftovers, leftovers
        assert not os.path.exists(os.path.join(model_dir, "run.lock"))
        _assert_same_state(_state(model_dir), reference["state"])


def test_diverging_run_stops_naming_the_step_and_saves_no_nan(tmp_path):
    model_dir = str(tmp_path / "run")
    result = _train(model_dir, None, "--lr=1e30", "--max_steps=6")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    line = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(line) == 1 and "at step" in line[0] and "lower --lr" in line[0], result.stderr[-2000:]
    # Whatever was saved holds finite numbers only, and the run resumes from it (and stops again).
    if _newest(model_dir):
        assert all(np.all(np.isfinite(v)) for v in _state(model_dir).values() if v.dtype.kind == "f")


def _mount_tmpfs(path, megabytes):
    os.makedirs(path, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", path], capture_output=True)
    return done.returncode == 0


def test_full_disk_while_checkpointing_gives_one_line_and_keeps_the_previous(tmp_path):
    disk = str(tmp_path / "disk")
    # Room for two checkpoints of this tiny model (2.3 MB each) and not a third.
    if not _mount_tmpfs(disk, 6):
        pytest.skip("needs a small tmpfs to fill (mount -t tmpfs): not permitted here")
    try:
        model_dir = os.path.join(disk, "run")
        full = _train(model_dir, None, "--keep_checkpoints=3")
        assert full.returncode == 1, full.stderr[-3000:]
        errors = [line for line in full.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "no space left on device" in errors[0], full.stderr[-2000:]
        assert "Traceback" not in full.stderr
        saved = _step(model_dir)
        assert saved >= 1
        # Room again: the rerun removes the half-written checkpoint and goes on from the intact one.
        subprocess.run(["mount", "-o", "remount,size=64m", disk], check=True)
        rerun = _train(model_dir, None, f"--max_steps={saved + 2}")
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert f"from step {saved}" in rerun.stdout and "_temp" in rerun.stdout  # "removed ...ckpt-N_temp"
        assert _step(model_dir) == saved + 2
    finally:
        subprocess.run(["umount", disk], capture_output=True)
