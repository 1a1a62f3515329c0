"""The training CLI end to end, in fresh processes: a short run, resume, errors, multi-worker."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tests.support.helpers import ENV, TINY, free_ports

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "moco_tf.train", *args], cwd=ROOT, env=env or ENV,
        capture_output=True, text=True, timeout=600,
    )


def _saved(model_dir):
    prefix = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    reader = tf.train.load_checkpoint(prefix)

    def value(name):
        return reader.get_tensor(f"{name}/.ATTRIBUTES/VARIABLE_VALUE")

    return {
        "step": int(value("optimizer/_iterations")),
        "epoch": int(value("epoch")),
        "queue": value("model/queue"),
        "ptr": int(value("model/queue_ptr")),
    }


def _step_lines(stdout: str) -> list[str]:
    """The progress lines' "step N/TOTAL" parts."""
    return [line.split(" | ")[0] for line in stdout.splitlines() if line.startswith("step ")]


def test_short_run_writes_checkpoint_logs_export_and_resumes(tmp_path):
    model_dir, export_dir = str(tmp_path / "run"), str(tmp_path / "export")
    first = _train(*TINY, f"--model_dir={model_dir}", "--max_steps=3", f"--export_dir={export_dir}", "--log_every=2")
    assert first.returncode == 0, first.stderr[-3000:]
    # stdout is a pipe, not a terminal: one plain line per --log_every steps, no progress bar
    # (its carriage returns and colours), and the epoch summaries.
    assert "\r" not in first.stdout and "\x1b[" not in first.stdout
    assert _step_lines(first.stdout) == ["step 2/3"], first.stdout
    line = next(line for line in first.stdout.splitlines() if line.startswith("step 2/3"))
    for key in ("loss", "acc", "logit_pos", "logit_neg", "lr", "img_per_s"):
        assert f"| {key} " in line, line
    state = _saved(model_dir)
    assert state["step"] == 3 and state["ptr"] == (3 * 32) % 64
    config = json.load(open(os.path.join(model_dir, "config.json")))
    assert config["model"]["backbone"] == {"arch": "resnet18", "width": 8, "cifar_stem": True}
    assert config["model"]["moco_momentum"] == 0.99 and config["optim"]["sgd_momentum"] == 0.9
    events = [f for _, _, files in os.walk(os.path.join(model_dir, "logs")) for f in files if "tfevents" in f]
    assert events, "no TensorBoard event files"
    assert os.path.exists(os.path.join(export_dir, "saved_model.pb"))
    assert "epoch 2/3" in first.stdout  # one-line epoch summaries

    # The narrow encoder loads at its width from the model_dir and from the export, to the same features.
    from moco_tf.interop import hub
    from moco_tf.weights.pretrained import load_backbone

    exported = hub.read_config(export_dir)
    assert exported["width"] == 8 and exported["feature_dim"] == 64
    x = np.random.RandomState(0).rand(2, 32, 32, 3).astype(np.float32)
    features = {}
    for path, kind in ((model_dir, "model_dir"), (export_dir, "export")):
        backbone, info = load_backbone(path)
        assert info["kind"] == kind and info["width"] == 8 and info["feature_dim"] == backbone.feature_dim == 64
        assert "width 8" in info["description"]
        features[kind] = backbone(x).numpy()
    assert features["export"].shape == (2, 64)
    np.testing.assert_allclose(features["model_dir"], features["export"], rtol=1e-5, atol=1e-5)

    # Rerunning the same command resumes: the step count and the queue continue from the checkpoint.
    second = _train(*TINY, f"--model_dir={model_dir}", "--max_steps=5", "--log_every=2")
    assert second.returncode == 0, second.stderr[-3000:]
    assert _step_lines(second.stdout) == ["step 4/5"], second.stdout  # steps 4 and 5: one line, at 4
    assert "resuming" in second.stdout and "from step 3" in second.stdout
    resumed = _saved(model_dir)
    assert resumed["step"] == 5 and resumed["epoch"] == 2 and resumed["ptr"] == (5 * 32) % 64
    # Rows written by steps 1..3 and not overwritten by steps 4..5 are kept as they were.
    kept = slice(0, 32)  # step 3 wrote rows 0..31 ((2*32) % 64); steps 4, 5 wrote 32..63 then 0..31 again
    assert not np.array_equal(resumed["queue"][kept], state["queue"][kept])
    np.testing.assert_array_equal(resumed["queue"].shape, state["queue"].shape)

    # Another recipe in the same model_dir is refused.
    other = _train(*TINY, f"--model_dir={model_dir}", "--width=16")
    assert other.returncode == 2 and "holds another run: --width=8 (now 16)" in other.stderr, other.stderr[-2000:]
    assert "Traceback" not in other.stderr


# Slow: CI covers 2 local workers in tests/test_run_multiworker_resume.py (same weights on both after a
# kill and restart) and tests/test_evaluation_knn.py; this one checks a plain run's outputs.
@pytest.mark.slow
def test_multi_worker_two_local_processes(tmp_path):
    """MultiWorkerMirroredStrategy, 2 processes on 127.0.0.1: same weights and queue, one checkpoint dir."""
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    model_dir = str(tmp_path / "run")
    procs = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        env = {**ENV, "TF_CONFIG": json.dumps(tf_config)}
        args = [*TINY, "--strategy=multi_worker", f"--model_dir={model_dir}", "--max_steps=2",
                f"--dump={tmp_path / f'worker{index}.npz'}"]
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tests", "support", "multiworker_worker.py"), *args],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    chief, other = (np.load(tmp_path / f"worker{i}.npz") for i in range(2))
    assert int(chief["ptr"]) == (2 * 32) % 64
    for key in chief.files:
        np.testing.assert_allclose(chief[key], other[key], rtol=0, atol=1e-6, err_msg=key)
    assert not np.allclose(chief["queue"][:32], chief["queue"][32:])
    # Exactly one checkpoint directory, the chief's, in model_dir.
    assert [d for d in os.listdir(model_dir) if d.startswith("checkpoints")] == ["checkpoints"]
    assert _saved(model_dir)["step"] == 2
    assert "epoch 1/3" in outputs[0][0] and "epoch 1/3" not in outputs[1][0]  # only the chief reports
