"""Load a frozen backbone from whatever PATH a user has: the one entry point of kNN and lincls.

PATH may be
- a moco_tf model_dir written by training (its latest checkpoint), or one checkpoint in it
  (the prefix `.../ckpt-N`, as `tf.train.CheckpointManager` names them);
- a TF-Hub export written by moco_tf (`moco_tf.export`, `moco_tf.convert --export_dir`);
- a PyTorch checkpoint file: official MoCo v1/v2/v3, a lincls checkpoint or a torchvision
  ResNet state_dict (converted on the fly by `moco_tf.interop.torch`).

Every kind comes back as the same thing: a moco_tf Keras ResNet taking ImageNet-normalised
images, called in inference mode. An export takes [0, 1] images and normalises inside; rather
than undo that (x * std + mean, then (x - mean) / std again, which is off by float rounding), the
backbone is rebuilt from the export's config and its variables are copied in, and a forward pass
through both confirms they agree.
"""

from __future__ import annotations

import json
import os
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from moco_tf.data import sources
from moco_tf.errors import UserError
from moco_tf.evaluation.frozen import FrozenBackbone
from moco_tf.interop import torch as from_torch
from moco_tf.models.backbones import BackboneSpec, official_dataset
from moco_tf.training.checkpoint import config_values, restore_model

KINDS = ("model_dir", "checkpoint", "export", "torch")


class PretrainedError(UserError):
    """PATH is not something a backbone can be loaded from; the message says what it accepts."""


_ACCEPTED = (
    "a moco_tf model_dir or checkpoint (model_dir/ckpt-N), a TF-Hub export from moco_tf, "
    "or a PyTorch checkpoint (.pth / .pth.tar)"
)


def load_backbone(path: str) -> tuple[FrozenBackbone, dict[str, Any]]:
    """(backbone, info) for PATH; info has kind, arch, cifar_stem, width (the ResNet's base
    channels, 64 as standard), feature_dim, image_size (the encoder's training resolution: 32 with
    the CIFAR stem, else 224), dataset, description.

    Raises PretrainedError (a ValueError) when PATH is none of the accepted kinds.
    """
    if not path:
        raise PretrainedError(f"no --pretrained PATH given: give {_ACCEPTED}")
    path = os.path.normpath(path)
    if tf.io.gfile.isdir(path):
        if tf.io.gfile.exists(os.path.join(path, "saved_model.pb")):
            model, info = _from_export(path)
        else:
            model, info = _from_model_dir(path, checkpoint=None)
    elif tf.io.gfile.exists(path + ".index"):
        model, info = _from_model_dir(os.path.dirname(path) or ".", checkpoint=path)
    elif tf.io.gfile.exists(path):
        model, info = _from_torch(path)
    else:
        raise PretrainedError(f"--pretrained={path} does not exist: give {_ACCEPTED}")
    spec = BackboneSpec.from_dict(info)
    info.update(spec.to_dict())
    info.setdefault("image_size", spec.default_image_size)
    info["feature_dim"] = int(model.output.shape[-1])
    info["path"] = path
    info["description"] = f"{spec.label} from {info['kind']} {path}"
    return FrozenBackbone(model), info


# ----------------------------------------------------------------------------------------------
# the kinds


def load_for_evaluation(
    path: str | None, dataset: str | None, data_dir: str | None, strict_data: bool = False
) -> tuple[FrozenBackbone, dict[str, Any], sources.Source]:
    """What kNN and lincls start from: (backbone, info) as `load_backbone`, and the labelled
    `moco_tf.data.sources` source to evaluate on. A missing PATH or a source without a val/test
    split is a ValueError (one line in the CLIs)."""
    if not path:
        raise ValueError("--pretrained=PATH is required (model_dir, checkpoint, TF-Hub export or .pth)")
    source = sources.make_source(dataset, data_dir, strict_data)
    if not source.eval_split:
        raise sources.DataError(f"{source.name} has no val/test split to evaluate on")
    backbone, info = load_backbone(path)
    return backbone, info, source


def _from_model_dir(model_dir: str, checkpoint: str | None) -> tuple[keras.Model, dict[str, Any]]:
    try:
        model, config = restore_model(checkpoint or model_dir)  # a checkpoint prefix or the latest
    except (FileNotFoundError, ValueError) as e:
        raise PretrainedError(f"--pretrained={checkpoint or model_dir}: {e}; give {_ACCEPTED}") from None
    recorded = config_values(config)
    info = {k: recorded[k] for k in ("image_size", "dataset") if recorded.get(k) is not None}
    info.update(config.model.backbone.to_dict(), kind="checkpoint" if checkpoint else "model_dir")
    # Rebuilt as an export is: the training backbone may fix its input size and split BN into
    # groups; evaluation runs at any size and batch (in inference mode the groups never matter).
    backbone = config.model.backbone.build()
    backbone.set_weights(model.backbone_q.get_weights())
    return backbone, info


def _from_export(export_dir: str) -> tuple[keras.Model, dict[str, Any]]:
    config_path = os.path.join(export_dir, "assets", "moco_config.json")
    if not tf.io.gfile.exists(config_path):
        raise PretrainedError(
            f"--pretrained={export_dir} is a SavedModel but not a moco_tf export (no assets/moco_config.json): "
            f"give {_ACCEPTED}"
        )
    with tf.io.gfile.GFile(config_path) as f:
        config = json.load(f)
    loaded = tf.saved_model.load(export_dir)
    if not isinstance(config, dict):
        raise PretrainedError(f"export {export_dir}: its moco_config.json is not a JSON object")
    try:  # exports written before `width` existed are standard ResNets: from_dict fills it in
        spec = BackboneSpec.from_dict(config)
    except ValueError as error:
        raise PretrainedError(f"export {export_dir}: its moco_config.json names no valid backbone ({error})") from None
    arch, cifar_stem, width = spec.arch, spec.cifar_stem, spec.width
    backbone = spec.build()
    # The export lists the backbone's variables first, in `backbone.weights` order, then the head's.
    exported = list(loaded.variables)[: len(backbone.weights)]
    shapes = [tuple(v.shape) for v in exported]
    if shapes != [tuple(w.shape) for w in backbone.weights]:
        raise PretrainedError(
            f"export {export_dir}: its variables do not fit a {arch} (cifar_stem={cifar_stem}, width={width})"
        )
    for weight, variable in zip(backbone.weights, exported, strict=True):
        weight.assign(variable)
    _check_same_as_export(backbone, loaded, config, export_dir)
    info = {"arch": arch, "cifar_stem": cifar_stem, "width": width, "kind": "export"}
    for key in ("image_size", "dataset"):
        if config.get(key) is not None:
            info[key] = config[key]
    return backbone, info


def _check_same_as_export(backbone: keras.Model, loaded, config: dict, export_dir: str) -> None:
    """The rebuilt backbone on normalised images must give the export's features on [0, 1] ones."""
    pre = config.get("preprocessing", {})
    spec = BackboneSpec.from_dict(config)
    mean = np.array(config.get("mean", pre.get("mean", spec.mean)), np.float32)
    std = np.array(config.get("std", pre.get("std", spec.std)), np.float32)
    size = 32 if spec.cifar_stem else 64  # small enough to be quick, large enough for the ImageNet stem
    images = np.random.RandomState(0).rand(2, size, size, 3).astype(np.float32)
    ours = backbone((images - mean) / std, training=False).numpy()
    theirs = loaded(tf.constant(images), training=False).numpy()
    if not np.allclose(ours, theirs, rtol=1e-4, atol=1e-4 * float(np.abs(theirs).max() + 1e-6)):
        raise PretrainedError(f"export {export_dir}: rebuilding its backbone does not reproduce its features")


def _from_torch(path: str) -> tuple[keras.Model, dict[str, Any]]:
    try:
        state = from_torch.state_dict_of(from_torch.read_torch_checkpoint(path))
        info = from_torch.describe_state_dict(state)
    except (from_torch.CheckpointError, ImportError):  # already one clear line
        raise
    except Exception as e:  # torch's own errors for files that are no checkpoint at all
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PretrainedError(f"--pretrained={path} is not a checkpoint ({first}): give {_ACCEPTED}") from None
    spec = BackboneSpec.from_dict(info)
    backbone = spec.build()
    from_torch.load_torch_state_dict(backbone, state)
    return backbone, {**spec.to_dict(), "kind": "torch", "dataset": official_dataset(spec.cifar_stem)}
