"""--steps_per_execution N: several train steps per call from the host (Keras runs its batch hooks
once per call). The run must stay the same run: a chain of calls of 2 and 3 steps, killed, stopped by
SIGTERM and resumed, ends bit-identical to one step per call; logs, checkpoints and stops land at
the end of the call that reaches (or passes) their step; a setting that cannot line up is refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest
import tensorflow as tf

from moco_tf.training import pretrain
from moco_tf.training.callbacks import passed_multiple
from moco_tf.training.config import ConfigError, PretrainConfig, RuntimeConfig
from tests.support.helpers import ENV, ROOT
from tests.test_run_kill_resume import _assert_same_state, _state, _step

# 3 steps an epoch (no multiple of 2 or 3: calls are cut at epoch ends), 4 epochs; lines and
# checkpoints every 6 steps, a multiple of both call lengths tried.
RUN = [
    "--flagfile=configs/quickstart.flags", "--batch_size=32", "--queue_size=64", "--bn_groups=2",
    "--steps_per_epoch=3", "--epochs=4", "--knn_every=0", "--checkpoint_every=6", "--log_every=6",
    "--keep_checkpoints=2", "--seed=3", "--deterministic", "--width=8", "--export_dir=",
]  # fmt: skip
TOTAL_STEPS = 12


def _train(model_dir, *extra, fault=None):
    command = [sys.executable, "-m", "moco_tf.train"]
    if fault:
        command = [sys.executable, os.path.join(ROOT, "tests", "support", "fault_injection.py"), *fault]
    command += [*RUN, f"--model_dir={model_dir}", *extra]
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def _scalar_steps(model_dir, tag):
    steps = set()
    for path in tf.io.gfile.glob(os.path.join(model_dir, "logs", "train", "*tfevents*")):
        try:
            for event in tf.compat.v1.train.summary_iterator(path):
                steps.update(event.step for value in event.summary.value if value.tag == tag)
        except tf.errors.DataLossError:  # the last record of a killed run's file may be cut short
            pass
    return sorted(steps)


def _step_lines(stdout):
    return [line.split(" | ")[0] for line in stdout.splitlines() if line.startswith("step ")]


def test_killed_stopped_and_resumed_with_calls_of_2_and_3_steps_equals_one_step_per_call(tmp_path):
    # The reference, one step per call, runs beside the chain (2 cores; each run mostly starts up).
    reference = str(tmp_path / "reference")
    done = []
    thread = threading.Thread(target=lambda: done.append(_train(reference, "--steps_per_execution=1")))
    thread.start()

    model_dir = str(tmp_path / "run")
    # Killed inside the third call (steps 4-5): the epoch-end checkpoint of step 3 is the newest.
    killed = _train(model_dir, "--steps_per_execution=2", fault=("step_mid", "3"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert _step(model_dir) == 3
    # SIGTERM inside the first call after the resume (steps 4-5): the call ends, step 5 is saved.
    stopped = _train(model_dir, "--steps_per_execution=2", fault=("sigterm_at_step", "1"))
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "stopped by SIGTERM at step 5" in stopped.stderr and "Traceback" not in stopped.stderr
    assert _step(model_dir) == 5
    # Resumed with calls of 3 (an operational setting: allowed to change): one call of 1 step to
    # the end of epoch 2, then calls of 3 that line up with the epochs.
    finished = _train(model_dir, "--steps_per_execution=3")
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "from step 5" in finished.stdout
    assert _step_lines(finished.stdout) == ["step 6/12", "step 12/12"], finished.stdout
    thread.join()
    assert done[0].returncode == 0, done[0].stderr[-3000:]
    assert _step(reference) == TOTAL_STEPS
    assert _step_lines(done[0].stdout) == ["step 6/12", "step 12/12"], done[0].stdout
    # TensorBoard's batch scalars too: at the optimizer's step, at the call that reaches a multiple
    # of --log_every (6 and 12: only the last run passed any), not at Keras's count of its calls.
    assert _scalar_steps(model_dir, "batch_loss") == [6, 12] == _scalar_steps(reference, "batch_loss")
    worst = _assert_same_state(_state(model_dir), _state(reference))
    print(f"max abs difference, calls of 2 then 3 killed/stopped/resumed vs one step per call: {worst:.3g}")
    assert worst == 0.0


def test_log_and_checkpoint_steps_must_be_multiples(tmp_path):
    config = PretrainConfig(runtime=RuntimeConfig(
        steps_per_execution=32, log_every=50, checkpoint_every=1000, model_dir=str(tmp_path / "run"),
    ))  # fmt: skip
    with pytest.raises(ConfigError) as refused:
        pretrain.pretrain(config)
    message = str(refused.value)
    assert "\n" not in message
    assert "--log_every 50 is not a multiple of --steps_per_execution 32" in message
    assert "e.g. --steps_per_execution 25" in message  # the largest divisor of 50 and 1000 up to 32
    assert not os.path.exists(tmp_path / "run")  # refused before anything was made
    config.runtime.log_every = 64
    with pytest.raises(ConfigError, match="--checkpoint_every 1000 is not a multiple of --steps_per_execution 32"):
        pretrain.pretrain(config)
    config.runtime.steps_per_execution = 0
    with pytest.raises(ConfigError, match="--steps_per_execution must be positive"):
        pretrain.pretrain(config)


def test_auto_is_1_off_a_tpu_and_a_divisor_of_the_log_and_checkpoint_steps_on_one():
    tpu = object.__new__(tf.distribute.TPUStrategy)  # only its type is looked at
    default = tf.distribute.get_strategy()
    for log_every, checkpoint_every, on_tpu in ((50, 1000, 25), (100, 1000, 25), (64, 0, 32), (7, 1000, 1),
                                                (96, 960, 32), (48, 1000, 8)):  # fmt: skip
        config = PretrainConfig(runtime=RuntimeConfig(log_every=log_every, checkpoint_every=checkpoint_every))
        assert pretrain.steps_per_execution(config, tpu) == on_tpu, (log_every, checkpoint_every)
        assert pretrain.steps_per_execution(config, default) == 1
        pretrain.check_steps_per_execution(config)  # auto never conflicts
    config = PretrainConfig(runtime=RuntimeConfig(steps_per_execution=4, log_every=8, checkpoint_every=0))
    assert pretrain.steps_per_execution(config, default) == 4 == pretrain.steps_per_execution(config, tpu)


def test_refused_with_several_replicas_of_mirrored():
    from moco_tf.training import distribute

    strategy = distribute.mirrored()  # the 2 logical CPUs of conftest
    config = PretrainConfig(runtime=RuntimeConfig(steps_per_execution=2, log_every=2, checkpoint_every=2))
    with pytest.raises(ConfigError, match="--steps_per_execution 2 needs --strategy=tpu or a single replica"):
        pretrain.steps_per_execution(config, strategy)
    config.runtime.steps_per_execution = None
    assert pretrain.steps_per_execution(config, strategy) == 1


def test_segments_are_single_epochs_when_calls_do_not_divide_an_epoch():
    assert pretrain._segments(0, 12, 3) == [(0, 4, 3)]
    assert pretrain._segments(0, 12, 3, 3) == [(0, 4, 3)]
    assert pretrain._segments(0, 12, 3, 2) == [(0, 1, 3), (1, 2, 3), (2, 3, 3), (3, 4, 3)]
    assert pretrain._segments(5, 12, 3, 2) == [(1, 2, 1), (2, 3, 3), (3, 4, 3)]
    assert pretrain._segments(5, 11, 3, 3) == [(1, 2, 1), (2, 3, 3), (3, 4, 2)]


def test_passed_multiple():
    assert [after for after in range(1, 13) if passed_multiple(after - 1, after, 4)] == [4, 8, 12]
    assert passed_multiple(3, 5, 4) and passed_multiple(4, 8, 4) and not passed_multiple(4, 7, 4)
    assert not passed_multiple(0, 100, 0)
