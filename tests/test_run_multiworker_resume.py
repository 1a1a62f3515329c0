"""2 local workers (MultiWorkerMirroredStrategy), one SIGKILLed mid-epoch, both
restarted: the survivor ends by itself with one line naming the lost worker, and the restarted
pair resumes from the last checkpoint and ends with the same weights on both workers.

Killing the chief runs in CI (~60 s); killing the other worker waits for TF's missed-heartbeat
deadline and also compares with an uninterrupted pair: slow, run with `-m slow` (~2-3 min).
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from moco_tf.training import distribute
from tests.support.helpers import ENV, free_ports

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS_PER_EPOCH, EPOCHS, EVERY, KILL_AT = 4, 3, 2, 7  # killed in epoch 2 of 3, one step after ckpt-6
TINY = [
    "--flagfile=configs/quickstart.flags", "--batch_size=32", "--queue_size=64", "--bn_groups=2",
    f"--steps_per_epoch={STEPS_PER_EPOCH}", f"--epochs={EPOCHS}", "--knn_every=0",
    f"--checkpoint_every={EVERY}", "--seed=1", "--width=8", "--strategy=multi_worker", "--export_dir=",
]


def _start(workers, index, model_dir, out_dir, run, *extra):
    tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
    args = [*TINY, f"--model_dir={model_dir}", f"--dump={out_dir / f'{run}-worker{index}.npz'}", *extra]
    # Files, not pipes: a worker blocked on a full pipe would look like a hang.
    stdout = open(out_dir / f"{run}-worker{index}.out", "w")
    stderr = open(out_dir / f"{run}-worker{index}.err", "w")
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tests", "support", "multiworker_worker.py"), *args],
        # TMPDIR: the non-chief's temporary checkpoint folder, left behind when it is killed, stays in out_dir.
        cwd=ROOT, env={**ENV, "TF_CONFIG": json.dumps(tf_config), "TMPDIR": str(out_dir)}, stdout=stdout, stderr=stderr,
    )
    stdout.close()
    stderr.close()
    return proc


def _read(out_dir, run, index):
    return (out_dir / f"{run}-worker{index}.out").read_text(), (out_dir / f"{run}-worker{index}.err").read_text()


def _latest_step(model_dir):
    prefix = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    return int(prefix.rsplit("-", 1)[1]) if prefix else None


def _pair(workers, model_dir, out_dir, run, extra=None):
    """Starts both workers (`extra[i]`: more flags of worker i); returns their exit codes."""
    extra = extra or {}
    procs = {i: _start(workers, i, model_dir, out_dir, run, *extra.get(i, [])) for i in range(2)}
    try:
        return [procs[i].wait(timeout=600) for i in range(2)]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()


def _kill_then_restart(tmp_path, victim):
    """Runs the pair until `victim` SIGKILLs itself after step KILL_AT, checks the survivor's exit,
    restarts both and returns their final states (chief's, other's)."""
    tmp_path.mkdir(exist_ok=True)
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    model_dir = str(tmp_path / "run")
    survivor = 1 - victim

    procs = {i: _start(workers, i, model_dir, tmp_path, "first", *(
        [f"--kill_at_step={KILL_AT}"] if i == victim else [])) for i in range(2)}
    try:
        assert procs[victim].wait(timeout=600) == -signal.SIGKILL, _read(tmp_path, "first", victim)
        died = time.monotonic()
        # The survivor waits in the next step's all-reduce: it must end by itself, soon, in one line.
        code = procs[survivor].wait(timeout=300)
        survivor_s = time.monotonic() - died
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    out, err = _read(tmp_path, "first", survivor)
    assert code == 1, err[-3000:]
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    # Killed inside an all-reduce, the peer's connection resets at once; killed between two steps,
    # it is missed heartbeats (distribute.HEARTBEAT_TIMEOUT_S) that reveal it.
    assert len(errors) == 1 and errors[0].startswith(f"error: lost worker {victim} ({workers[victim]}): "), err[-3000:]
    assert errors[0].endswith("restart the same command on every host of TF_CONFIG to resume from the last checkpoint")
    assert survivor_s < distribute.HEARTBEAT_TIMEOUT_S + 60, survivor_s
    print(f"survivor worker {survivor} exited {survivor_s:.1f} s after worker {victim} was killed: {errors[0]}")
    # Step KILL_AT was never checkpointed and the next step cannot finish without the victim.
    resumed_at = KILL_AT - KILL_AT % EVERY
    assert _latest_step(model_dir) == resumed_at

    codes = _pair(workers, model_dir, tmp_path, "again")
    for i in range(2):
        assert codes[i] == 0, _read(tmp_path, "again", i)[1][-3000:]
    for i in range(2):
        assert f"from step {resumed_at} " in _read(tmp_path, "again", i)[0]
    chief, other = (np.load(tmp_path / f"again-worker{i}.npz") for i in range(2))
    assert int(chief["step"]) == STEPS_PER_EPOCH * EPOCHS
    assert chief.files == other.files
    for key in chief.files:
        np.testing.assert_allclose(chief[key], other[key], rtol=0, atol=1e-6, err_msg=key)
    assert _latest_step(model_dir) == STEPS_PER_EPOCH * EPOCHS
    return chief, other


def test_chief_killed_mid_epoch_then_both_restarted(tmp_path):
    """The chief (also TF's coordination leader) dies: the other worker's connection to it resets."""
    _kill_then_restart(tmp_path, victim=0)


@pytest.mark.slow
def test_worker_killed_mid_epoch_resumes_like_an_uninterrupted_pair(tmp_path):
    """The non-chief dies between two steps (noticed by missed heartbeats); the resumed pair ends
    where an uninterrupted pair does."""
    resumed, _ = _kill_then_restart(tmp_path / "killed", victim=1)
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    (tmp_path / "straight").mkdir()
    codes = _pair(workers, str(tmp_path / "straight" / "run"), tmp_path / "straight", "straight")
    assert codes == [0, 0], _read(tmp_path / "straight", "straight", 0)[1][-3000:]
    straight = np.load(tmp_path / "straight" / "straight-worker0.npz")
    worst = max(float(np.max(np.abs(resumed[k] - straight[k]))) for k in straight.files)
    print(f"resumed vs uninterrupted pair: max abs difference {worst:.3g}")
    for key in straight.files:
        np.testing.assert_allclose(resumed[key], straight[key], rtol=0, atol=1e-6, err_msg=key)
