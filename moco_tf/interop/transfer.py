"""What every transfer format starts from: a MoCo encoder (backbone + projection head if any) read
from anything `--pretrained` takes, and the rules for writing a single-file target.

`load_encoder(path)` reads the backbone with `moco_tf.weights.pretrained.load_backbone` (the one
reader of model_dirs, checkpoints, TF-Hub exports and PyTorch checkpoints) and adds the MoCo
projection head where the source has one (a model_dir's query head, an export's "projection"
variables, an official checkpoint's `fc` / `fc.0`, `fc.2`).

The writers (`moco_tf.interop.hub`, `.keras_hub`, `.torch`, `.onnx`) take an `Encoder`; each
format's optional dependency is imported only by its writer, and a missing one is one line naming
the pip command (`require`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import keras
import tensorflow as tf

from moco_tf.atomic_write import Protected
from moco_tf.models.backbones import BackboneSpec
from moco_tf.models.moco import projection_head


@dataclass
class Encoder:
    """A MoCo query encoder ready to be written in any format."""

    backbone: keras.Model  # moco_tf.models.resnet, ImageNet-normalised images -> pooled features
    head: keras.Model | None  # the MoCo projection head (layers "fc" or "fc.0", "fc.2"), if any
    spec: BackboneSpec
    config: dict[str, Any] = field(default_factory=dict)  # what an export's moco_config.json records
    source: str = ""  # the path it was read from
    protected: Protected = field(default_factory=dict)  # paths a target must keep clear of

    @property
    def epochs(self) -> int:
        epochs = self.config.get("epochs")
        return int(epochs) if isinstance(epochs, int) and not isinstance(epochs, bool) else 0


def source_protected(path: str) -> dict[str, str]:
    """What a target written from `path` must not be, contain or lie inside."""
    path = os.path.normpath(path)
    if not os.path.isdir(path) and os.path.isfile(path + ".index"):  # a checkpoint prefix
        return {
            os.path.dirname(path) or ".": "the checkpoints folder",
            os.path.dirname(os.path.dirname(path)) or ".": "the model_dir",
        }
    what = "the model_dir"
    if os.path.isfile(path):
        what = "the torch checkpoint"
    elif os.path.isfile(os.path.join(path, "saved_model.pb")):
        what = "the source export"
    return {path: what}


def load_encoder(path: str) -> Encoder:
    """The backbone (via `load_backbone`) and MoCo head of PATH (anything `--pretrained` takes)."""
    from moco_tf.weights.pretrained import load_backbone

    frozen, info = load_backbone(path)
    backbone = frozen.model
    backbone.trainable = True  # load_backbone freezes it for evaluation; a writer only reads it
    spec = BackboneSpec.from_dict(info)
    kind = info.get("kind")
    head, config = None, {}
    if kind in ("model_dir", "checkpoint"):
        head, config = _model_dir_head(path)
    elif kind == "export":
        head, config = _export_head(path, len(backbone.weights), spec)
    elif kind == "torch":
        head, config = _torch_head(path, spec)
    config = {**config, **spec.to_dict(), "feature_dim": spec.feature_dim}
    for key in ("image_size", "dataset"):
        if info.get(key) is not None:
            config.setdefault(key, info[key])
    return Encoder(backbone, head, spec, config, path, source_protected(path))


def _model_dir_head(path: str) -> tuple[keras.Model, dict[str, Any]]:
    from moco_tf.training.checkpoint import config_values, restore_model

    model, config = restore_model(os.path.normpath(path))
    values = config_values(config)
    run_dir = path if os.path.isdir(path) else os.path.dirname(os.path.dirname(path))
    values["source"] = f"moco_tf model_dir {os.path.abspath(run_dir)}"
    values.update(mlp=model.mlp, dim=model.dim)
    finished = _finished_epochs(path)
    if finished is not None:
        values["epochs"] = finished  # what the official "epoch" means: epochs completed
    return model.encoder_q.head, values


def _finished_epochs(path: str) -> int | None:
    """The `epoch` counter (epochs completed) of the checkpoint a model_dir / prefix restores."""
    from moco_tf.training.checkpoint_files import CHECKPOINT_DIR, newest_intact

    path = os.path.normpath(path)
    prefix = path if os.path.isfile(path + ".index") else newest_intact(os.path.join(path, CHECKPOINT_DIR))
    try:
        return int(tf.train.load_checkpoint(prefix).get_tensor("epoch/.ATTRIBUTES/VARIABLE_VALUE"))
    except Exception:  # no counter recorded (a converted model_dir): the run's config says
        return None


def _export_head(path: str, backbone_count: int, spec: BackboneSpec) -> tuple[keras.Model | None, dict[str, Any]]:
    """The export's MoCo head, read as data like its backbone (`weights.pretrained.ExportVariables`):
    the SavedModel's graph is never loaded, so nothing in it runs."""
    from moco_tf.weights.pretrained import ExportVariables, read_export_config

    config = read_export_config(path)
    config = {k: v for k, v in config.items() if k not in ("preprocessing", "signatures", "keras3_endpoints")}
    projection = config.get("projection_dim")
    if not projection or config.get("num_classes"):
        return None, config
    variables = ExportVariables(path)
    # The export lists the backbone's variables first, then the head's (moco_tf.interop.hub);
    # load_backbone has already checked that they are all there with the shapes of this head.
    mlp = variables.count - backbone_count == 4
    head = projection_head(spec.feature_dim, int(projection), mlp)
    for i, weight in enumerate(head.weights):
        weight.assign(variables.read(backbone_count + i))
    config.update(mlp=mlp, dim=int(projection))
    return head, config


def _torch_head(path: str, spec: BackboneSpec) -> tuple[keras.Model | None, dict[str, Any]]:
    from moco_tf.weights import torch_checkpoint as from_torch

    checkpoint = from_torch.read_torch_checkpoint(path)
    state = from_torch.state_dict_of(checkpoint)
    info = from_torch.describe_state_dict(state)
    epoch = checkpoint.get("epoch")
    config = {"source": f"PyTorch checkpoint {os.path.basename(path)} ({info['layout']} layout)"}
    if isinstance(epoch, int):
        config["epochs"] = epoch
    if info["head"] not in ("v1", "v2"):
        return None, config
    head = projection_head(spec.feature_dim, info["dim"], info["mlp"])
    from_torch.load_torch_state_dict(spec.build(), state, head=head)
    config.update(mlp=info["mlp"], dim=info["dim"], moco_version="v2" if info["mlp"] else "v1")
    return head, config
