"""A run's model_dir: its recipe (config.json) and its checkpoints (query and key encoders, queue,
pointer, optimizer, epoch), with resume and a guard against mixing runs.

Resume never trusts the `checkpoints/checkpoint` record alone: the checkpoint files are listed
from disk, the newest one is read through before it is used, and a broken one (a kill between
the data file and the index, a truncated file) is moved aside and the next older one taken.
A model_dir holding checkpoint files never silently starts over at step 0."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import tensorflow as tf

from moco_tf import atomic_write, outputs
from moco_tf.models.moco import MoCo
from moco_tf.training.checkpoint_files import (
    CHECKPOINT_DIR,
    CKPT_TEMP,
    CheckpointError,
    checkpoint_files,
    newest_intact,
    restore_matching,
    unreadable,
    warn,
)
from moco_tf.training.config import ConfigError, PretrainConfig
from moco_tf.training.optimizers import SGD

CONFIG_FILE = "config.json"


def read_config(model_dir: str) -> PretrainConfig | None:
    """model_dir/config.json; None if absent."""
    path = os.path.join(model_dir, CONFIG_FILE)
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not a moco_tf config (not UTF-8 text); use a new --model_dir") from None
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}); restore it or use a new --model_dir") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{path} does not hold a moco_tf config (a JSON object); use a new --model_dir")
    try:
        config = PretrainConfig.from_json(text)  # (again, refusing a key given twice)
        config.check_bounds()  # a value read from the file has the bounds of the flag that set it
    except ConfigError as error:
        raise CheckpointError(f"{path}: {error}; restore it or use a new --model_dir") from None
    return config


def check_run_folder(model_dir: str, saved: PretrainConfig | None) -> None:
    """Refuses, before anything in it is moved or written, a model_dir that is not a pretraining
    run of moco_tf's: one of another command (lincls, finetune), or checkpoints without moco_tf's
    config.json (another project's, or a run whose config was lost)."""
    for name, command in outputs.RUN_CONFIG_FILES.items():
        if command != "train" and tf.io.gfile.exists(os.path.join(model_dir, name)):
            raise CheckpointError(
                f"{model_dir} holds a {command} run ({name}), not a pretraining run; use another --model_dir"
            )
    if saved is not None:
        return
    for folder in (os.path.join(model_dir, CHECKPOINT_DIR), model_dir):
        if checkpoint_files(folder) or tf.io.gfile.exists(os.path.join(folder, "checkpoint")):
            raise CheckpointError(
                f"{folder} holds checkpoints but {model_dir} has no moco_tf {CONFIG_FILE}: not touching them "
                "(restore the config.json, or use another --model_dir)"
            )


def write_config(model_dir: str, config: PretrainConfig) -> None:
    """Atomic (`atomic_write.write_atomic`, gs:// too), so a crash never leaves half a file."""
    path = os.path.join(model_dir, CONFIG_FILE)
    try:
        atomic_write.write_atomic(path, config.to_json().encode("utf-8"))
    except (OSError, tf.errors.OpError) as error:
        atomic_write.raise_if_disk_full(error, "config", path, previous=False)
        raise CheckpointError(f"cannot write {path}: {atomic_write.reason(error)}") from None


def build_model(config: PretrainConfig, color_in_step: bool = False) -> MoCo:
    """The MoCo model `config.model` describes (MoCo takes its settings by the same names), its input
    size fixed to `config.data.image_size`; `color_in_step`: its train step runs the colour stage of
    `config.data`'s views."""
    settings = {f.name: getattr(config.model, f.name) for f in dataclasses.fields(config.model)}
    return MoCo(**settings, image_size=config.data.image_size, aug=config.data.aug, blur=config.data.blur,
                color_in_step=color_in_step)


def config_values(config: PretrainConfig) -> dict[str, Any]:
    """The recipe config.json records, by flag name (unrecorded ones left out), with moco_version and
    source: what an export's moco_config.json and the pretrained loaders report (no local paths)."""
    values = {k: v for k, v in config.recipe_settings().items() if k not in config.unrecorded}
    values["moco_version"] = config.moco_version
    if config.source is not None:
        values["source"] = config.source
    return values


def make_checkpoint(
    model: MoCo, optimizer, epoch: tf.Variable, data_seed: tf.Variable | None = None
) -> tf.train.Checkpoint:
    """model (encoders, queue, pointer), optimizer (step counter = the input position, slots), finished
    epochs and the data order's seed: everything a resumed run needs to continue exactly."""
    # Build the optimizer first: its momentum buffers must exist to be saved and restored.
    optimizer.build(model.encoder_q.trainable_variables)
    extra = {"data_seed": data_seed} if data_seed is not None else {}
    return tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch, **extra)


def manager(checkpoint: tf.train.Checkpoint, directory: str, keep: int = 3) -> tf.train.CheckpointManager:
    return tf.train.CheckpointManager(checkpoint, directory, max_to_keep=keep)


def worker_checkpoint_dir(model_dir: str, chief: bool) -> str:
    """Every multi-worker process must save (reads may be collective); only the chief's copy is
    kept, the others write to a temporary folder and delete it."""
    if chief:
        return os.path.join(model_dir, CHECKPOINT_DIR)
    _remove_dead_workers_dirs()
    return tempfile.mkdtemp(prefix=f"{_WORKER_DIR_PREFIX}{os.getpid()}_")


_WORKER_DIR_PREFIX = "moco_tf_worker_ckpt_"


def _remove_dead_workers_dirs() -> None:
    """A killed non-chief worker leaves its throw-away checkpoint folder in the temp folder; the next
    start removes those whose process (named in the folder's name) no longer runs on this host."""
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        match = re.match(rf"^{_WORKER_DIR_PREFIX}(\d+)_", name)
        if not match or int(match.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def remove_worker_dir(path: str, chief: bool) -> None:
    if not chief:
        shutil.rmtree(path, ignore_errors=True)


def write_model_dir(model_dir: str, model: MoCo, recorded: Mapping[str, Any]) -> str:
    """A new model_dir holding `model` as step 0 (e.g. converted weights), ready to train or evaluate.

    recorded: what is known of the recipe besides the model (flag names, e.g. dataset, image_size,
    source); the rest is left unrecorded, so a run resumed from it is not compared on it."""
    values = {
        "arch": model.arch, "width": model.width, "cifar_stem": model.cifar_stem, "dim": model.dim,
        "mlp": model.mlp, "queue_size": model.queue_size, "moco_momentum": model.moco_momentum,
        "temperature": model.temperature, "symmetric": model.symmetric, "shuffle_bn": model.shuffle_bn,
        "bn_groups": model.bn_groups,
    }
    values.update({k: v for k, v in recorded.items() if v is not None})
    try:
        config = PretrainConfig.from_record(values)
    except ConfigError as error:
        raise CheckpointError(f"cannot record {model_dir}/{CONFIG_FILE}: {error}") from None
    write_config(model_dir, config)
    checkpoint = make_checkpoint(model, SGD(0.0), tf.Variable(0, dtype=tf.int64))
    manager(checkpoint, os.path.join(model_dir, CHECKPOINT_DIR)).save(checkpoint_number=0)
    return model_dir


def restore_model(model_dir: str) -> tuple[MoCo, PretrainConfig]:
    """The MoCo model of the newest intact checkpoint in model_dir (a model_dir or a checkpoint prefix),
    and the run's config."""
    prefix = None
    if not tf.io.gfile.isdir(model_dir) and tf.io.gfile.exists(model_dir + ".index"):
        prefix, model_dir = model_dir, os.path.dirname(os.path.dirname(model_dir))
        problem = unreadable(prefix)
        if problem:
            raise CheckpointError(f"checkpoint {prefix} is unreadable: {problem}")
    config = read_config(model_dir)
    if config is None:
        raise FileNotFoundError(f"{model_dir} is not a moco_tf model_dir (no {CONFIG_FILE})")
    prefix = prefix or newest_intact(os.path.join(model_dir, CHECKPOINT_DIR), log=warn)
    if prefix is None:
        raise FileNotFoundError(f"{model_dir} holds no checkpoint yet")
    model = build_model(config)
    # Every weight of the network its config.json describes, or one line (the optimizer's slots
    # in the checkpoint are not needed to use the weights).
    restore_matching(tf.train.Checkpoint(model=model), prefix, f"the network {model_dir}/{CONFIG_FILE} describes")
    return model, config


def remove_leftovers(ckpt_dir: str, model_dir: str) -> list[str]:
    """Deletes what a killed run of ours leaves behind: TF's `ckpt-N_temp/` save folders and a
    half-written config.json's temporary file. Only names this program creates; call it holding
    the run lock."""
    removed = []
    if tf.io.gfile.isdir(ckpt_dir):
        for name in tf.io.gfile.listdir(ckpt_dir):
            name = name.rstrip("/")
            if CKPT_TEMP.match(name):
                tf.io.gfile.rmtree(os.path.join(ckpt_dir, name))
                removed.append(os.path.join(ckpt_dir, name))
    removed += atomic_write.remove_temp_files(os.path.join(model_dir, CONFIG_FILE))
    return removed
