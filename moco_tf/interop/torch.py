"""Official PyTorch MoCo checkpoints to moco_tf and back (`python -m moco_tf.convert`, `python -m
moco_tf.export --format=pth`): a .pth.tar converted to a TF-Hub export or to a model_dir that
training and lincls go on from, and a moco_tf encoder written as an official `.pth.tar`.

Reading a checkpoint, and the torch <-> Keras key table, is `moco_tf.weights.torch_checkpoint`'s.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from moco_tf.atomic_write import (
    Protected,
    TargetError,
    check_existing_folder,
    recover_leftovers,
    refuse_overlap,
    replace,
)
from moco_tf.interop.hub import check_export_target, export_backbone
from moco_tf.models.backbones import default_image_size, official_dataset
from moco_tf.models.moco import MoCo, projection_head
from moco_tf.training import recipes
from moco_tf.training.checkpoint import write_model_dir
from moco_tf.training.config import PretrainConfig
from moco_tf.weights.torch_checkpoint import (
    CheckpointError,
    LoadReport,
    check_checkpoint_file,
    describe_state_dict,
    load_torch_state_dict,
    read_torch_checkpoint,
    spec_of,
    state_dict_of,
    torch_state_dict,
)

# ---------------------------------------------------------------- whole conversions


def convert_to_export(torch_checkpoint: str, export_dir: str, overwrite: bool = False) -> str:
    """Official MoCo / torchvision checkpoint -> TF-Hub export (backbone, plus MoCo head if any).

    export_dir follows `moco_tf.interop.hub.check_export_target`: an existing moco_tf export is
    replaced only with overwrite, anything else never; it may not be or contain the checkpoint.
    """
    check_checkpoint_file(torch_checkpoint)
    protected = {torch_checkpoint: "the torch checkpoint"}
    check_export_target(export_dir, overwrite, protected)  # before reading a large checkpoint
    checkpoint = read_torch_checkpoint(torch_checkpoint)
    state = state_dict_of(checkpoint)
    info = describe_state_dict(state)
    spec = spec_of(info)
    backbone = spec.build()
    head = None
    if info["head"] in ("v1", "v2"):
        head = projection_head(spec.feature_dim, info["dim"], info["mlp"])
    report = load_torch_state_dict(backbone, state, head=head)
    config = _config_from_checkpoint(torch_checkpoint, checkpoint, report)
    return export_backbone(backbone, export_dir, config, head=head, overwrite=overwrite, protected=protected)


def convert_to_model_dir(torch_checkpoint: str, model_dir: str, overwrite: bool = False) -> str:
    """Official MoCo v1/v2 checkpoint -> moco_tf model_dir from which training or lincls go on.

    The query and key encoders, heads and queue come from the checkpoint; the optimizer's
    momentum buffers do not (they restart at zero).

    model_dir must be new or empty; with overwrite it may also be a model_dir this function wrote
    before and nothing has trained in since (`is_converted_model_dir`). Anything else (a training
    run, a user's folder) is never written into. The model_dir is written beside and renamed into
    place, so an interrupted conversion leaves the previous state.
    """
    model_dir = os.path.normpath(model_dir)
    check_checkpoint_file(torch_checkpoint)
    check_model_dir_target(model_dir, overwrite, protected={torch_checkpoint: "the torch checkpoint"})
    checkpoint = read_torch_checkpoint(torch_checkpoint)
    state = state_dict_of(checkpoint)
    info = describe_state_dict(state)
    if info["head"] not in ("v1", "v2"):
        raise CheckpointError(
            f"{torch_checkpoint} has no MoCo v1/v2 head ({info['layout']} layout, head "
            f"{info['head']}); a model_dir needs one. Use --export_dir for its backbone."
        )
    kwargs = {"backbone": spec_of(info), "dim": info["dim"], "mlp": info["mlp"]}
    kwargs["temperature"] = official_recipe("v2" if info["mlp"] else "v1")["temperature"]
    if info["queue_size"]:
        kwargs["queue_size"] = info["queue_size"]
    model = MoCo(**kwargs)
    report = load_torch_state_dict(model, state)
    config = _config_from_checkpoint(torch_checkpoint, checkpoint, report)
    config.update(dim=info["dim"], queue_size=info["queue_size"])
    replace(
        model_dir,
        lambda path: write_model_dir(path, model, config),
        recheck=lambda: _check_existing_model_dir(model_dir, overwrite),
        what="model_dir",
    )
    return model_dir


# What a model_dir holds right after convert_to_model_dir, and nothing else: no training since.
_CONVERTED_ENTRIES = frozenset({"config.json", "checkpoints"})
_CONVERTED_CHECKPOINT_FILES = frozenset({"checkpoint", "ckpt-0.index", "ckpt-0.data-00000-of-00001"})


def is_converted_model_dir(path: str) -> bool:
    """Whether `path` is a model_dir written by convert_to_model_dir that nothing has trained in:
    config.json naming a PyTorch checkpoint as its source, and only the step-0 checkpoint."""
    try:
        if not os.path.isdir(path) or os.path.islink(path) or set(os.listdir(path)) != _CONVERTED_ENTRIES:
            return False
        checkpoints = set(os.listdir(os.path.join(path, "checkpoints")))
        with open(os.path.join(path, "config.json")) as f:
            source = json.load(f).get("source", "")
    except (OSError, ValueError, AttributeError):
        return False
    return (
        isinstance(source, str)
        and source.startswith("PyTorch checkpoint ")
        and "ckpt-0.index" in checkpoints
        and checkpoints <= _CONVERTED_CHECKPOINT_FILES
    )


def check_model_dir_target(model_dir: str, overwrite: bool = False, protected: Protected = ()) -> None:
    """Raise TargetError (one line) unless convert_to_model_dir may write `model_dir`; also
    tidies up after a conversion that was killed (see `moco_tf.interop.hub.check_export_target`)."""
    if not model_dir:
        raise TargetError("no model_dir given")
    refuse_overlap(model_dir, protected, "model_dir")
    recover_leftovers(model_dir, is_converted_model_dir)
    _check_existing_model_dir(model_dir, overwrite)


def _check_existing_model_dir(model_dir: str, overwrite: bool) -> None:
    check_existing_folder(
        model_dir, overwrite, is_converted_model_dir, None, "",
        "empty and not a model_dir written by moco_tf.convert (a training run, or other files)", "a model_dir",
        refusing=f"refusing to write model_dir {model_dir}:", choose="choose a new --model_dir",
    )


# What a converted model_dir records of the official ImageNet recipe it was trained with (the
# registry's moco_v1_imagenet / moco_v2_imagenet), so that training can go on with the same settings.
_RECORDED_FROM_RECIPE = ("temperature", "lr", "batch_size", "schedule", "aug")


def official_recipe(version: str) -> dict[str, Any]:
    """The recorded settings of the official ImageNet recipe of MoCo `version` ("v1" or "v2")."""
    values = recipes.settings(PretrainConfig, {"v1": "moco_v1_imagenet", "v2": "moco_v2_imagenet"}[version])
    return {name: values[name] for name in _RECORDED_FROM_RECIPE}


def _config_from_checkpoint(path: str, checkpoint: Mapping[str, Any], report: LoadReport) -> dict[str, Any]:
    epoch = checkpoint.get("epoch")  # the official code saves the number of epochs completed
    version = {"v1": "v1", "v2": "v2", "v3_projector": "v3"}.get(report.head)
    config = {
        "arch": report.arch,
        "cifar_stem": report.cifar_stem,
        "mlp": report.mlp,
        "moco_version": version,
        "epochs": int(epoch) if isinstance(epoch, int | np.integer) else None,
        "dataset": official_dataset(report.cifar_stem),
        "image_size": default_image_size(report.cifar_stem),
        "source": f"PyTorch checkpoint {os.path.basename(path)} ({report.layout} layout)",
    }
    if version in ("v1", "v2") and not report.cifar_stem:
        config.update(official_recipe(version))
    return config


# ---------------------------------------------------------------- moco_tf -> official checkpoint

# The entry of a checkpoint written by moco_tf that says so (and how it was made); a .pth.tar
# without it is never replaced.
PTH_MARKER = "moco_tf"


def official_checkpoint(encoder) -> dict[str, Any]:
    """The official MoCo checkpoint layout of a `moco_tf.interop.transfer.Encoder`: {"epoch",
    "arch", "state_dict" {"module.encoder_q.*": tensor}} plus the `moco_tf` entry (plain strings,
    numbers and booleans: `torch.load(weights_only=True)` reads it all)."""
    import torch

    state = {k: torch.from_numpy(v) for k, v in torch_state_dict(encoder.backbone, encoder.head).items()}
    for key in [k for k in state if k.endswith(".running_var")]:
        # torchvision's BatchNorm2d has this buffer; without it a strict load reports it missing
        # (main_lincls.py asserts missing_keys == {"fc.weight", "fc.bias"}). No counterpart here.
        state[key.removesuffix("running_var") + "num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    marker = {
        "format": "official MoCo checkpoint layout (query encoder only)",
        "width": encoder.spec.width,
        "cifar_stem": encoder.spec.cifar_stem,
        "mlp": bool(encoder.head is not None and len(encoder.head.weights) == 4),
        "head": encoder.head is not None,
    }
    for key in ("source", "moco_version", "dataset", "image_size"):
        value = encoder.config.get(key)
        if isinstance(value, str | int) and not isinstance(value, bool):
            marker[key] = value
    return {
        "epoch": encoder.epochs,
        "arch": encoder.spec.arch,
        "state_dict": {f"module.encoder_q.{k}": v for k, v in state.items()},
        PTH_MARKER: marker,
    }


def is_moco_tf_checkpoint(path: str) -> bool:
    """Whether `path` is a .pth.tar written by `write_official_checkpoint` (its `moco_tf` entry)."""
    try:
        import torch

        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # unreadable, not torch's, or pickling code: not ours
        return False
    return isinstance(checkpoint, Mapping) and isinstance(checkpoint.get(PTH_MARKER), Mapping)


def check_pth_target(path: str, overwrite: bool = False, protected=()) -> None:
    from moco_tf.interop.targets import check_file_target, require

    require("torch", "torch", "--format=pth")
    check_file_target(path, overwrite, protected, is_moco_tf_checkpoint, "PyTorch checkpoint")


def write_official_checkpoint(encoder, path: str, overwrite: bool = False) -> str:
    """Write `encoder` (a `moco_tf.interop.transfer.Encoder`) as an official MoCo `.pth.tar`, which
    `moco_tf.convert`, main_lincls.py, convert-pretrain-to-detectron2.py and a torchvision ResNet
    read. Atomic (staging beside, then rename); an existing file is replaced only when moco_tf
    wrote it and overwrite was asked."""
    from moco_tf.interop.targets import check_existing_file, require

    torch = require("torch", "torch", "--format=pth")
    path = os.path.normpath(path)
    check_pth_target(path, overwrite, encoder.protected)
    checkpoint = official_checkpoint(encoder)
    replace(
        path,
        lambda new: torch.save(checkpoint, new),
        lambda: check_existing_file(path, overwrite, is_moco_tf_checkpoint, "PyTorch checkpoint"),
        what="PyTorch checkpoint",
    )
    return path
