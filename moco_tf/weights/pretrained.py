"""Load a frozen backbone from whatever PATH a user has: the one entry point of kNN and lincls.

PATH may be
- a moco_tf model_dir written by training (its latest checkpoint), or one checkpoint in it
  (the prefix `.../ckpt-N`, as `tf.train.CheckpointManager` names them);
- a TF-Hub export written by moco_tf (`moco_tf.export`, `moco_tf.convert --export_dir`);
- a PyTorch checkpoint file: official MoCo v1/v2/v3, a lincls checkpoint or a torchvision
  ResNet state_dict (converted on the fly by `moco_tf.weights.torch_checkpoint`).

Every kind comes back as the same thing: a moco_tf Keras ResNet taking ImageNet-normalised
images, called in inference mode. Nothing loaded runs code of its own: a PyTorch file is read
weights-only, and an export is read as data, never through `tf.saved_model.load` (which would run
its graph): the backbone is rebuilt from the export's moco_config.json with moco_tf's code and its
values read from the export's variables checkpoint; a folder whose variables do not fit the
rebuilt network is refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from moco_tf.data import sources
from moco_tf.data.sources import MIN_IMAGE_SIZE
from moco_tf.errors import UserError
from moco_tf.evaluation.frozen import FrozenBackbone
from moco_tf.models.backbones import BackboneSpec, official_dataset
from moco_tf.training.checkpoint import config_values, restore_model
from moco_tf.training.config import ConfigError, check_recorded
from moco_tf.weights import torch_checkpoint as from_torch

KINDS = ("model_dir", "checkpoint", "export", "torch")
# What a moco_tf export says about itself, in its assets/ (written by moco_tf.interop.hub).
CONFIG_ASSET = "moco_config.json"


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
    """An export read as data: its moco_config.json says which network to build with moco_tf's own
    code, its variables checkpoint holds the values. The SavedModel's graph (saved_model.pb) is
    never loaded: a graph may hold any op (a file write, say), and loading one runs them."""
    config = read_export_config(export_dir)
    spec = BackboneSpec.from_dict(config)
    variables = ExportVariables(export_dir)
    variables.check_first(spec)  # before building: a width the file does not hold is refused here
    backbone = spec.build()
    expected = [(tuple(w.shape), w.dtype) for w in backbone.weights]
    expected += _head_shapes(config, spec, variables.count - len(expected))
    variables.check_matches(expected, spec)
    variables.assign(backbone.weights)
    info = {**spec.to_dict(), "kind": "export"}
    for key in ("image_size", "dataset"):
        if config.get(key) is not None:
            info[key] = config[key]
    return backbone, info


# The largest moco_config.json read (a moco_tf export's is about 2 kB).
_MAX_CONFIG_BYTES = 1 << 20
# Recorded image sizes above this are no resolution an encoder was trained at (ImageNet's is 224);
# evaluating at one would resize every image to it.
MAX_RECORDED_IMAGE_SIZE = 4096


def read_export_config(export_dir: str) -> dict[str, Any]:
    """An export's assets/moco_config.json, its values checked (with the bounds of the flags that
    set them) before anything is built; PretrainedError (one line) when it is missing or invalid."""
    config_path = os.path.join(export_dir, "assets", CONFIG_ASSET)
    if not tf.io.gfile.exists(config_path):
        raise PretrainedError(
            f"--pretrained={export_dir} is a SavedModel but not a moco_tf export (no assets/{CONFIG_ASSET}): "
            f"give {_ACCEPTED}"
        )
    where = f"export {export_dir}: its {CONFIG_ASSET}"
    try:
        if tf.io.gfile.stat(config_path).length > _MAX_CONFIG_BYTES:
            raise PretrainedError(f"{where} is larger than {_MAX_CONFIG_BYTES} bytes: not one moco_tf wrote")
        with tf.io.gfile.GFile(config_path, "rb") as f:
            config = json.loads(f.read().decode("utf-8"))
    except (OSError, tf.errors.OpError, UnicodeDecodeError, ValueError) as error:
        if isinstance(error, PretrainedError):
            raise
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise PretrainedError(f"{where} is not readable JSON ({first})") from None
    if not isinstance(config, dict):
        raise PretrainedError(f"{where} is not a JSON object")
    try:  # a backbone moco_tf can build
        BackboneSpec.from_dict(config)
    except ValueError as error:
        raise PretrainedError(f"{where} names no valid backbone ({error})") from None
    for key in ("image_size", "projection_dim", "num_classes", "dim"):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise PretrainedError(f"{where} records {key}={value!r}: must be a positive integer")
    size = config.get("image_size")
    if size is not None and not MIN_IMAGE_SIZE <= size <= MAX_RECORDED_IMAGE_SIZE:
        raise PretrainedError(
            f"{where} records image_size={size}: must be in [{MIN_IMAGE_SIZE}, {MAX_RECORDED_IMAGE_SIZE}]"
        )
    for key in ("mlp", "cifar_stem"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            raise PretrainedError(f"{where} records {key}={config[key]!r}: must be true or false")
    if config.get("dataset") is not None and not isinstance(config["dataset"], str):
        raise PretrainedError(f"{where} records dataset={config['dataset']!r}: must be a name")
    try:  # what it records by flag name (queue_size, width, ...) within the bounds of those flags
        check_recorded(config, where)
    except ConfigError as error:
        raise PretrainedError(str(error)) from None
    return config


def _head_shapes(config: Mapping[str, Any], spec: BackboneSpec, left: int) -> list[tuple[tuple[int, ...], Any]]:
    """The shapes the export's variables after the backbone's must have: the MoCo projection head
    when moco_config.json records projection_dim (`moco_tf.models.moco.projection_head`: fc, or
    fc.0 and fc.2 for v2's MLP), then the fine-tuned classifier (a Dense) when it records
    num_classes. Computed, not built: a huge recorded dim must not allocate anything."""
    features, shapes = spec.feature_dim, []
    dim, classes = config.get("projection_dim"), config.get("num_classes")
    if dim is not None:
        mlp = config.get("mlp")
        if mlp is None:  # not recorded by every writer: v2's head has 4 variables, v1's 2
            mlp = left - (2 if classes is not None else 0) == 4
        if mlp:
            shapes += [(features, features), (features,)]
        shapes += [(features, dim), (dim,)]
    if classes is not None:
        shapes += [(features, classes), (classes,)]
    return [(shape, "float32") for shape in shapes]


class ExportVariables:
    """The values in an export's variables checkpoint (variables/variables.{index,data-*}), read
    with `tf.train.load_checkpoint` (a table of named tensors; nothing in it is run). moco_tf's
    HubModule saves its `variables` list, so the i-th is keyed "variables/i/.ATTRIBUTES/VARIABLE_VALUE":
    the backbone's in `backbone.weights` order, then the head's, then the classifier's."""

    _OBJECT_GRAPH = "_CHECKPOINTABLE_OBJECT_GRAPH"

    def __init__(self, export_dir: str):
        self.export_dir = export_dir
        prefix = os.path.join(export_dir, "variables", "variables")
        try:
            self._reader = tf.train.load_checkpoint(prefix)
            shapes = self._reader.get_variable_to_shape_map()
            dtypes = self._reader.get_variable_to_dtype_map()
        except (tf.errors.OpError, ValueError, OSError) as error:
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise PretrainedError(f"export {export_dir}: its variables are unreadable ({first})") from None
        self.shapes = {k: tuple(v) for k, v in shapes.items() if k != self._OBJECT_GRAPH}
        self.dtypes = {k: dtypes[k] for k in self.shapes}
        self.count = sum(1 for k in self.shapes if _index(k) is not None)
        declared = sum(int(np.prod(shape, dtype=np.float64)) * self.dtypes[k].size for k, shape in self.shapes.items())
        stored = sum(tf.io.gfile.stat(p).length for p in tf.io.gfile.glob(prefix + ".data-*"))
        if declared > stored:  # a truncated file, or an index claiming tensors it does not hold
            raise PretrainedError(
                f"export {export_dir}: its variables index declares {declared} bytes, its data files hold {stored} "
                "(truncated or not moco_tf's)"
            )

    @staticmethod
    def key(i: int) -> str:
        return f"variables/{i}/.ATTRIBUTES/VARIABLE_VALUE"

    def check_first(self, spec: BackboneSpec) -> None:
        """The stem's kernel (the first variable) must have `width` output channels."""
        first = self.shapes.get(self.key(0))
        if first is None:
            count = len(self.shapes)
            self._refuse(spec, f"it has no {_short(self.key(0))} ({count} variables, none in an export's layout)")
        if not first or first[-1] != spec.width:
            shown = list(first)
            self._refuse(spec, f"its first variable has shape {shown}, a {spec.label} stem has {spec.width} channels")

    def check_matches(self, expected: list[tuple[tuple[int, ...], Any]], spec: BackboneSpec) -> None:
        """Exactly the variables `expected` lists ((shape, dtype) in order): none missing, none extra."""
        names = [self.key(i) for i in range(len(expected))]
        extra = sorted(set(self.shapes) - set(names), key=lambda k: (_index(k) is None, _index(k) or 0, k))
        missing = [n for n in names if n not in self.shapes]
        if missing or extra:
            first = _short(extra[0]) + " is extra" if extra else _short(missing[0]) + " is missing"
            self._refuse(spec, f"{len(self.shapes)} variables where it has {len(expected)} ({first})")
        for name, (shape, dtype) in zip(names, expected, strict=True):
            if self.shapes[name] != tuple(shape) or self.dtypes[name] != tf.as_dtype(dtype):
                self._refuse(spec, f"{_short(name)} is {self.dtypes[name].name} {list(self.shapes[name])}, "
                                   f"expected {tf.as_dtype(dtype).name} {list(shape)}")

    def assign(self, weights: list[Any]) -> None:
        for i, weight in enumerate(weights):
            weight.assign(self.read(i))

    def read(self, i: int) -> np.ndarray:
        """The i-th variable's value."""
        try:
            return self._reader.get_tensor(self.key(i))
        except tf.errors.OpError as error:  # a data file damaged after its index was written
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise PretrainedError(f"export {self.export_dir}: its variables are unreadable ({first})") from None

    def _refuse(self, spec: BackboneSpec, why: str) -> None:
        raise PretrainedError(
            f"export {self.export_dir}: its variables do not fit a {spec.arch} (cifar_stem={spec.cifar_stem}, "
            f"width={spec.width}): {why}; is it a moco_tf export?"
        )


def _short(key: str) -> str:
    return key.split("/.ATTRIBUTES")[0]


def _index(key: str) -> int | None:
    """i for "variables/i/.ATTRIBUTES/VARIABLE_VALUE", else None."""
    parts = key.split("/")
    if len(parts) == 4 and parts[0] == "variables" and parts[1].isdigit() and key == ExportVariables.key(int(parts[1])):
        return int(parts[1])
    return None


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
