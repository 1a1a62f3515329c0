"""A run's model_dir: its recipe (config.json) and its checkpoints (query and key encoders, queue,
pointer, optimizer, epoch), with resume and a guard against mixing runs."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import tensorflow as tf

from moco_tf.model import MoCo
from moco_tf.optimizers import SGD
from moco_tf.resnet import STANDARD_WIDTH

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
# What makes a run a different run: resuming with any of these changed is refused.
RECIPE_KEYS = (
    "arch", "cifar_stem", "width", "dim", "mlp", "queue_size", "symmetric", "bn_groups", "dataset",
    "image_size", "aug", "batch_size", "epochs", "schedule", "lr",
)
MODEL_KEYS = (
    "arch", "dim", "queue_size", "momentum", "temperature", "mlp", "shuffle_bn", "bn_groups",
    "symmetric", "cifar_stem", "width",
)
# Keys added after model_dirs were first written: a config.json without them means these values.
DEFAULTS = {"width": STANDARD_WIDTH}


class RunMismatchError(ValueError):
    """model_dir holds a run of another recipe."""


def read_config(model_dir: str) -> dict[str, Any] | None:
    """model_dir/config.json, with DEFAULTS for the keys an older moco_tf did not write; None if absent."""
    path = os.path.join(model_dir, CONFIG_FILE)
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        return with_defaults(json.load(f))


def with_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    """`config` with DEFAULTS filled in where a key is missing (or null)."""
    full = dict(config)
    for key, value in DEFAULTS.items():
        if full.get(key) is None:
            full[key] = value
    return full


def write_config(model_dir: str, config: Mapping[str, Any]) -> None:
    """Atomic: written beside and renamed, so a crash never leaves half a file."""
    tf.io.gfile.makedirs(model_dir)
    path = os.path.join(model_dir, CONFIG_FILE)
    with tf.io.gfile.GFile(path + ".tmp", "w") as f:
        json.dump(dict(config), f, indent=2, sort_keys=True)
    tf.io.gfile.rename(path + ".tmp", path, overwrite=True)


def check_same_run(saved: Mapping[str, Any], config: Mapping[str, Any], model_dir: str) -> None:
    """Refuses to resume a run of another recipe, naming what differs."""
    saved, config = with_defaults(saved), with_defaults(config)
    differ = [f"{k}={saved.get(k)!r} (now {config.get(k)!r})" for k in RECIPE_KEYS if saved.get(k) != config.get(k)]
    if differ:
        raise RunMismatchError(
            f"model_dir {model_dir} holds another run: {', '.join(differ)}; use a new --model_dir"
        )


def build_model(config: Mapping[str, Any]) -> MoCo:
    kwargs = {k: config[k] for k in MODEL_KEYS if config.get(k) is not None}
    return MoCo(image_size=config.get("image_size"), **kwargs)


def make_checkpoint(model: MoCo, optimizer, epoch: tf.Variable) -> tf.train.Checkpoint:
    # Build the optimizer first: its momentum buffers must exist to be saved and restored.
    optimizer.build(model.encoder_q.trainable_variables)
    return tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch)


def manager(checkpoint: tf.train.Checkpoint, directory: str, keep: int = 3) -> tf.train.CheckpointManager:
    return tf.train.CheckpointManager(checkpoint, directory, max_to_keep=keep)


def worker_checkpoint_dir(model_dir: str, chief: bool) -> str:
    """Every multi-worker process must save (reads may be collective); only the chief's copy is
    kept, the others write to a temporary folder and delete it."""
    if chief:
        return os.path.join(model_dir, CHECKPOINT_DIR)
    return tempfile.mkdtemp(prefix="moco_tf_worker_ckpt_")


def remove_worker_dir(path: str, chief: bool) -> None:
    if not chief:
        shutil.rmtree(path, ignore_errors=True)


def write_model_dir(model_dir: str, model: MoCo, config: Mapping[str, Any]) -> str:
    """A new model_dir holding `model` as step 0 (e.g. converted weights), ready to train or evaluate."""
    full = {k: getattr(model, k) for k in MODEL_KEYS}
    full.update({k: v for k, v in config.items() if v is not None})
    write_config(model_dir, full)
    checkpoint = make_checkpoint(model, SGD(0.0), tf.Variable(0, dtype=tf.int64))
    manager(checkpoint, os.path.join(model_dir, CHECKPOINT_DIR)).save(checkpoint_number=0)
    return model_dir


def restore_model(model_dir: str) -> tuple[MoCo, dict[str, Any]]:
    """The MoCo model of the latest checkpoint in model_dir (a model_dir or a checkpoint prefix)."""
    prefix = None
    if not tf.io.gfile.isdir(model_dir) and tf.io.gfile.exists(model_dir + ".index"):
        prefix, model_dir = model_dir, os.path.dirname(os.path.dirname(model_dir))
    config = read_config(model_dir)
    if config is None:
        raise FileNotFoundError(f"{model_dir} is not a moco_tf model_dir (no {CONFIG_FILE})")
    prefix = prefix or tf.train.latest_checkpoint(os.path.join(model_dir, CHECKPOINT_DIR))
    if prefix is None:
        raise FileNotFoundError(f"{model_dir} holds no checkpoint yet")
    model = build_model(config)
    # The optimizer is not needed to use the weights: expect_partial() skips it quietly.
    tf.train.Checkpoint(model=model).restore(prefix).expect_partial()
    return model, config
