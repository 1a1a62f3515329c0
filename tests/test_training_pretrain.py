"""`moco_tf.pretrain(PretrainConfig)`: a whole run from Python, no flags (a notebook's way in),
interrupted without signal handlers, resumed, and a recipe change refused against it."""

import json
import logging
import os
import signal

import numpy as np
import pytest

import moco_tf
from moco_tf.models.backbones import BackboneSpec
from moco_tf.training.callbacks import TrainingLogs
from moco_tf.training.config import DataConfig, ModelConfig, OptimConfig, PretrainConfig, RuntimeConfig


def _tiny(model_dir: str, max_steps: int) -> PretrainConfig:
    return PretrainConfig(
        model=ModelConfig(BackboneSpec("resnet18", width=8, cifar_stem=True), dim=16, queue_size=64,
                          moco_momentum=0.99, temperature=0.2, mlp=True, bn_groups=2),
        data=DataConfig(dataset="digits", aug="v2"),
        optim=OptimConfig(epochs=2, batch_size=32, lr=0.06, schedule="cosine"),
        runtime=RuntimeConfig(seed=1, model_dir=model_dir, steps_per_epoch=2, max_steps=max_steps, knn_every=0),
    )


def test_pretrain_from_python_interrupted_then_resumed(tmp_path, monkeypatch, caplog):
    """A whole run from Python. No signal handlers unless asked: a notebook's interrupt
    (KeyboardInterrupt, raised here by a callback at step 3, mid-epoch) ends pretrain with that
    KeyboardInterrupt, after the step reached is saved; calling pretrain again resumes there; a
    recipe change is refused against it, naming the flag."""
    model_dir = str(tmp_path / "run")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    seen_during_run = []
    real_hook = TrainingLogs.on_train_batch_end

    def interrupt_at_step_3(self, batch, logs=None):
        real_hook(self, batch, logs)
        seen_during_run.append({sig: signal.getsignal(sig) for sig in handlers})
        if int(self.model.optimizer.iterations.numpy()) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(TrainingLogs, "on_train_batch_end", interrupt_at_step_3)
    caplog.set_level(logging.INFO, logger="moco_tf")
    with pytest.raises(KeyboardInterrupt):
        moco_tf.pretrain(_tiny(model_dir, max_steps=4), progress="none")
    assert seen_during_run and all(seen == handlers for seen in seen_during_run)  # none installed
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    checkpoints = os.path.join(model_dir, "checkpoints")
    assert os.path.exists(os.path.join(checkpoints, "ckpt-3.index"))  # not an epoch's end nor a multiple
    assert any(f"interrupted at step 3: checkpoint saved in {model_dir}" in r.getMessage() for r in caplog.records)
    saved = json.load(open(os.path.join(model_dir, "config.json")))
    assert saved["format_version"] == 2 and saved["moco_version"] == "v2"
    assert saved["model"]["backbone"] == {"arch": "resnet18", "width": 8, "cifar_stem": True}
    assert saved["runtime"]["max_steps"] == 4 and saved["data"]["image_size"] == 32  # the CIFAR stem's default

    monkeypatch.setattr(TrainingLogs, "on_train_batch_end", real_hook)
    caplog.clear()
    model, history = moco_tf.pretrain(_tiny(model_dir, max_steps=4), progress="none")
    assert model.width == 8 and model.image_size == 32
    assert int(model.optimizer.iterations.numpy()) == 4 and len(history["loss"]) == 1
    assert np.isfinite(history["loss"][0]) and history["loss"][0] > 0
    assert any(f"resuming {model_dir} from step 3" in r.getMessage() for r in caplog.records)

    with pytest.raises(moco_tf.training.config.RunMismatchError, match=r"--moco_momentum=0.99 \(now 0.9\)"):
        moco_tf.pretrain(_tiny(model_dir, max_steps=5).replace(moco_momentum=0.9), progress="none")
