"""Reading official PyTorch MoCo (and torchvision ResNet) checkpoints into moco_tf models, and the
torch <-> Keras key table both ways (`torch_state_dict`, for the writers in moco_tf.interop).

Reads, with the architecture detected from the keys:
- official MoCo v1/v2 checkpoints: {"epoch", "arch", "state_dict": {"module.encoder_q.*",
  "module.encoder_k.*", "module.queue", "module.queue_ptr"}, "optimizer"}; v1 head `fc`,
  v2 head `fc.0` / `fc.2`;
- MoCo v3 ResNet checkpoints (`module.base_encoder.*`; its projector is not a v1/v2 head);
- linear-classification checkpoints and plain torchvision ResNet state_dicts (their `fc` is a
  classifier, not a MoCo head); with or without DataParallel's `module.` prefix.

Layouts: torch conv weights are OIHW, Keras kernels HWIO; torch Linear weights are [out, in],
Keras Dense kernels [in, out]; BatchNorm weight/bias/running_mean/running_var map to
gamma/beta/moving_mean/moving_variance (num_batches_tracked has no counterpart: moco_tf's
BatchNorm uses a fixed momentum, as the official runs do). The official queue buffer is
[dim, K] with keys as columns; moco_tf's queue holds keys as rows.

torch is imported only to read a checkpoint file, and always with `weights_only=True`: a
checkpoint can never run code.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from moco_tf.errors import UserError
from moco_tf.models.backbones import BackboneSpec
from moco_tf.models.batchnorm import BatchNorm
from moco_tf.models.resnet import SPECS

TORCH_INSTALL_HINT = (
    "PyTorch is needed only to read .pth checkpoints; install the CPU build with "
    "`pip install torch --index-url https://download.pytorch.org/whl/cpu`"
)


class CheckpointError(UserError):
    """A checkpoint that must not be loaded or does not fit the model; the message says why."""


class NotACheckpointError(UserError):
    """The file is not something torch.load reads (truncated, or another format)."""


@dataclass
class LoadReport:
    """What `load_torch_state_dict` found and did."""

    arch: str
    cifar_stem: bool
    layout: str  # "moco" (encoder_q/encoder_k), "moco_v3" (base_encoder) or "plain" (torchvision)
    head: str | None  # "v1", "v2" (MoCo heads), "classifier", "v3_projector" or None
    loaded: list[str] = field(default_factory=list)  # checkpoint keys written into the model
    ignored: dict[str, str] = field(default_factory=dict)  # checkpoint key -> why it was not used

    @property
    def mlp(self) -> bool:
        return self.head == "v2"


# ---------------------------------------------------------------- reading a checkpoint file


def read_torch_checkpoint(path: str) -> dict[str, Any]:
    """torch.load(path) with weights_only=True, on CPU; refuses checkpoints that pickle code."""
    check_checkpoint_file(path)
    try:
        import torch
    except ImportError as e:
        raise ImportError(TORCH_INSTALL_HINT) from e
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is long; its one telling line names what the unpickler met.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        detail = next((line for line in lines if "Unsupported" in line), lines[0])
        if "Unsupported global" in detail:
            # weights_only refuses any global outside tensors and plain containers: unpickling
            # such a file could run code.
            raise CheckpointError(
                f"refusing {path}: it pickles Python objects beyond weights, and unpickling it could "
                f"run code (torch.load(weights_only=True): {detail})"
            ) from e
        raise NotACheckpointError(f"{path} is not a checkpoint torch.load can read ({detail})") from e
    except (EOFError, KeyError, RuntimeError, ValueError) as e:  # truncated or not torch.save's
        raise NotACheckpointError(f"{path} is not a checkpoint torch.load can read ({type(e).__name__}: {e})") from e
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a state_dict or checkpoint dict")
    return checkpoint


def check_checkpoint_file(path: str) -> None:
    """A missing path is a FileNotFoundError, a folder a CheckpointError asking for the file."""
    if os.path.isdir(path):
        raise CheckpointError(f"torch checkpoint {path} is a directory; give the checkpoint file (.pth / .pth.tar)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"torch checkpoint {path} does not exist")


def state_dict_of(checkpoint: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The weights of a loaded checkpoint as numpy arrays: its "state_dict" (official MoCo,
    lincls), its "model" entry, or the object itself (a bare torchvision state_dict)."""
    for key in ("state_dict", "model"):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            checkpoint = checkpoint[key]
            break
    return {key: _to_numpy(key, value) for key, value in checkpoint.items()}


# ---------------------------------------------------------------- understanding the keys


@dataclass
class _Parts:
    layout: str
    encoder: dict[str, np.ndarray]  # torchvision keys of the query / base encoder, fc included
    key_encoder: dict[str, np.ndarray] | None
    buffers: dict[str, np.ndarray]  # queue, queue_ptr
    ignored: dict[str, str]
    unknown: list[str]


def _split(state_dict: Mapping[str, Any]) -> _Parts:
    state = {k: v if isinstance(v, np.ndarray) else _to_numpy(k, v) for k, v in state_dict.items()}
    if state and all(k.startswith("module.") for k in state):  # DataParallel / DDP
        state = {k.removeprefix("module."): v for k, v in state.items()}

    def take(prefix: str) -> dict[str, np.ndarray]:
        return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}

    ignored, unknown = {}, []
    if any(k.startswith("encoder_q.") for k in state):
        layout, encoder, key_encoder = "moco", take("encoder_q."), take("encoder_k.") or None
        buffers = {k: state[k] for k in ("queue", "queue_ptr") if k in state}
        for k in state:
            if not k.startswith(("encoder_q.", "encoder_k.")) and k not in buffers:
                unknown.append(k)
    elif any(k.startswith("base_encoder.") for k in state):
        layout, encoder, key_encoder, buffers = "moco_v3", take("base_encoder."), None, {}
        for k in state:
            if k.startswith(("momentum_encoder.", "predictor.")):
                ignored[k] = "MoCo v3 momentum encoder / predictor: not part of a v1/v2 model"
            elif not k.startswith("base_encoder."):
                unknown.append(k)
    else:
        layout, encoder, key_encoder, buffers = "plain", state, None, {}
    return _Parts(layout, encoder, key_encoder, buffers, ignored, unknown)


def _to_numpy(key: str, value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch.Tensor; .numpy() keeps torch out of this module
        value = value.detach().cpu()
        if str(value.dtype) in ("torch.bfloat16", "torch.float16"):  # numpy has no bfloat16
            value = value.float()
        return value.numpy()
    if not isinstance(value, np.ndarray | np.generic | int | float):
        raise CheckpointError(f"not a state_dict: entry {key!r} is a {type(value).__name__}")
    return np.asarray(value)


def _encoder_keys(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    parts = _split(state_dict)
    if not parts.encoder:
        raise CheckpointError("no ResNet weights found in the state_dict")
    return parts.encoder


def detect_arch(state_dict: Mapping[str, Any]) -> str:
    """"resnet18" ... "resnet152" from the blocks per stage and the block kind in the keys."""
    keys = _encoder_keys(state_dict)
    blocks = []
    for stage in range(1, 5):
        indices = {int(m.group(1)) for k in keys if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        blocks.append(max(indices) + 1 if indices else 0)
    kind = "bottleneck" if "layer1.0.conv3.weight" in keys else "basic"
    for depth, spec in SPECS.items():
        if spec == (kind, tuple(blocks)):
            return f"resnet{depth}"
    raise CheckpointError(
        f"not a torchvision ResNet: {kind} blocks per stage {tuple(blocks)} match none of "
        + ", ".join(f"resnet{d} {s[1]}" for d, s in SPECS.items())
    )


def detect_cifar_stem(state_dict: Mapping[str, Any]) -> bool:
    """True for the 3x3 first conv of the CIFAR variant, False for ImageNet's 7x7."""
    conv1 = _encoder_keys(state_dict).get("conv1.weight")
    if conv1 is None:
        raise CheckpointError("no conv1.weight in the state_dict")
    return conv1.shape[-1] == 3


def detect_width(state_dict: Mapping[str, Any]) -> int:
    """The ResNet's base channels: conv1's output channels (64 for every torchvision ResNet)."""
    conv1 = _encoder_keys(state_dict).get("conv1.weight")
    if conv1 is None:
        raise CheckpointError("no conv1.weight in the state_dict")
    return int(conv1.shape[0])


def _head_kind(layout: str, encoder: Mapping[str, np.ndarray]) -> str | None:
    fc = {k for k in encoder if k.startswith("fc.")}
    if not fc:
        return None
    if layout == "moco_v3":
        return "v3_projector"
    if layout == "plain":
        return "classifier"  # lincls / torchvision: fc has num_classes outputs, not a MoCo head
    if fc == {"fc.weight", "fc.bias"}:
        return "v1"
    if fc == {"fc.0.weight", "fc.0.bias", "fc.2.weight", "fc.2.bias"}:
        return "v2"
    raise CheckpointError(f"unrecognised MoCo head keys: {sorted(fc)}")


def spec_of(info: Mapping[str, Any]) -> BackboneSpec:
    """The backbone `describe_state_dict` found."""
    return BackboneSpec(info["arch"], info["width"], info["cifar_stem"])


def describe_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """arch, cifar_stem, width, layout, head kind, projection dim and queue size of a checkpoint."""
    parts = _split(state_dict)
    head = _head_kind(parts.layout, parts.encoder)
    info = {
        "arch": detect_arch(parts.encoder),
        "cifar_stem": detect_cifar_stem(parts.encoder),
        "width": detect_width(parts.encoder),
        "layout": parts.layout,
        "head": head,
        "mlp": head == "v2",
        "dim": None,
        "queue_size": None,
    }
    if head == "v1":
        info["dim"] = int(parts.encoder["fc.weight"].shape[0])
    elif head == "v2":
        info["dim"] = int(parts.encoder["fc.2.weight"].shape[0])
    if "queue" in parts.buffers:
        info["queue_size"] = int(parts.buffers["queue"].shape[1])
    return info


# ---------------------------------------------------------------- torch key -> Keras variable

_Target = tuple[Any, Callable[[np.ndarray], np.ndarray]]  # (keras variable, torch -> keras layout)


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _conv_kernel(x: np.ndarray) -> np.ndarray:
    return np.transpose(x, (2, 3, 1, 0)) if x.ndim == 4 else x  # OIHW -> HWIO


def _dense_kernel(x: np.ndarray) -> np.ndarray:
    return np.transpose(x) if x.ndim == 2 else x  # [out, in] -> [in, out]


def _targets(model: keras.Model, prefix: str = "") -> dict[str, _Target]:
    """torch key -> (variable, layout transform) for every weight of a backbone or head."""
    targets: dict[str, _Target] = {}
    for layer in model.layers:
        name = prefix + layer.name
        if isinstance(layer, keras.layers.Conv2D):
            targets[f"{name}.weight"] = (layer.kernel, _conv_kernel)
            if layer.use_bias:
                targets[f"{name}.bias"] = (layer.bias, _same)
        elif isinstance(layer, BatchNorm | keras.layers.BatchNormalization):
            targets[f"{name}.weight"] = (layer.gamma, _same)
            targets[f"{name}.bias"] = (layer.beta, _same)
            targets[f"{name}.running_mean"] = (layer.moving_mean, _same)
            targets[f"{name}.running_var"] = (layer.moving_variance, _same)
        elif isinstance(layer, keras.layers.Dense):
            targets[f"{name}.weight"] = (layer.kernel, _dense_kernel)
            targets[f"{name}.bias"] = (layer.bias, _same)
        elif layer.weights:
            raise TypeError(f"layer {layer.name} ({type(layer).__name__}) has no torch mapping")
    return targets


class _Plan:
    """Collects (variable, value) pairs and every mismatch; assigns only if there is none."""

    def __init__(self):
        self.assignments: list[tuple[Any, np.ndarray]] = []
        self.loaded: list[str] = []
        self.missing: list[str] = []
        self.unexpected: list[str] = []
        self.misshapen: list[str] = []

    def match(self, targets: Mapping[str, _Target], tensors: Mapping[str, np.ndarray], where: str):
        for key in tensors:
            if key not in targets and not key.endswith("num_batches_tracked"):
                self.unexpected.append(where + key)
        for key, (variable, transform) in targets.items():
            if key not in tensors:
                self.missing.append(where + key)
                continue
            value = transform(tensors[key])
            if tuple(value.shape) != tuple(variable.shape):
                self.misshapen.append(
                    f"{where}{key}: checkpoint {tuple(tensors[key].shape)}, "
                    f"model {tuple(variable.shape)} (after layout change {tuple(value.shape)})"
                )
                continue
            self.assignments.append((variable, value))
            self.loaded.append(where + key)

    def add(self, key: str, variable, value: np.ndarray) -> None:
        if tuple(value.shape) != tuple(variable.shape):
            self.misshapen.append(f"{key}: checkpoint {value.shape}, model {tuple(variable.shape)}")
        else:
            self.assignments.append((variable, value))
            self.loaded.append(key)

    def apply(self) -> None:
        problems = [
            (f"{len(keys)} {what}", keys)
            for what, keys in (
                ("missing (in the model, not in the checkpoint)", self.missing),
                ("unexpected (in the checkpoint, not in the model)", self.unexpected),
                ("misshapen", self.misshapen),
            )
            if keys
        ]
        if problems:
            lines = []
            for title, keys in problems:
                shown = keys[:20] + ([f"... and {len(keys) - 20} more"] if len(keys) > 20 else [])
                lines.append(f"{title} keys: " + ", ".join(shown))
            raise CheckpointError("the checkpoint does not fit the model: " + "; ".join(lines))
        for variable, value in self.assignments:
            variable.assign(value.astype(variable.dtype))


def _backbone_weights(encoder: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in encoder.items() if not k.startswith("fc.")}


def _head_weights(encoder: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in encoder.items() if k.startswith("fc.")}


def _is_moco(model) -> bool:
    return hasattr(model, "encoder_q") and hasattr(model, "encoder_k")


def _built_head(head: keras.Model, in_dim: int) -> keras.Model:
    if not head.built:
        head.build((None, in_dim))
    return head


def load_torch_state_dict(
    model_or_backbone: keras.Model,
    state_dict: Mapping[str, Any],
    head: keras.Model | None = None,
) -> LoadReport:
    """Load a PyTorch MoCo / torchvision ResNet state_dict into a moco_tf model, in place.

    model_or_backbone: a `moco_tf.MoCo` (query encoder and head; key encoder from `encoder_k.*`
        or else copied from the query encoder, as MoCo initialises it; queue and queue pointer
        when present) or a `moco_tf.models.resnet` backbone (head, key encoder and queue are reported
        in `LoadReport.ignored`).
    state_dict: torchvision keys, with or without the `module.encoder_q.` / `module.base_encoder.`
        / `module.` / `encoder_q.` prefixes; torch tensors or numpy arrays.
    head: with a bare backbone, a Dense head (layers "fc", or "fc.0" and "fc.2") to receive the
        checkpoint's MoCo head.

    Nothing is written unless everything fits: missing, unexpected or misshapen keys raise a
    CheckpointError listing them. A MoCo model whose head differs from the checkpoint's (v1 fc
    vs v2 MLP, other dim) is such a mismatch; a checkpoint without a MoCo head (lincls,
    torchvision, MoCo v3) leaves the model's head as it is and says so in the report.
    """
    parts = _split(state_dict)
    head_kind = _head_kind(parts.layout, parts.encoder)
    report = LoadReport(
        arch=detect_arch(parts.encoder),
        cifar_stem=detect_cifar_stem(parts.encoder),
        layout=parts.layout,
        head=head_kind,
        ignored=dict(parts.ignored),
    )
    plan = _Plan()
    plan.unexpected.extend(parts.unknown)
    moco_head = head_kind in ("v1", "v2")
    head_weights = _head_weights(parts.encoder)
    why_not_head = {
        "classifier": "a classifier (lincls / torchvision fc), not a MoCo head",
        "v3_projector": "MoCo v3 projector: not a v1/v2 head",
    }

    if _is_moco(model_or_backbone):
        model = model_or_backbone
        backbone_q, head_q = model.encoder_q.backbone, model.encoder_q.head
        feature_dim = int(backbone_q.output.shape[-1])
        plan.match(_targets(backbone_q), _backbone_weights(parts.encoder), "encoder_q.")
        if moco_head:
            plan.match(_targets(_built_head(head_q, feature_dim)), head_weights, "encoder_q.")
        else:
            for key in head_weights:
                report.ignored["encoder_q." + key] = why_not_head[head_kind]
        if parts.key_encoder is not None:
            encoder_k = model.encoder_k
            plan.match(_targets(encoder_k.backbone), _backbone_weights(parts.key_encoder), "encoder_k.")
            if moco_head:
                k_head = _built_head(encoder_k.head, feature_dim)
                plan.match(_targets(k_head), _head_weights(parts.key_encoder), "encoder_k.")
        for name, buffer in parts.buffers.items():
            variable = getattr(model, name)
            value = buffer.T if name == "queue" else buffer.reshape(tuple(variable.shape))
            plan.add(name, variable, value)
        plan.apply()
        if parts.key_encoder is None:
            # MoCo's key encoder starts as an exact copy of the query encoder.
            for q, k in zip(model.encoder_q.weights, model.encoder_k.weights, strict=True):
                k.assign(q)
    else:
        backbone = model_or_backbone
        plan.match(_targets(backbone), _backbone_weights(parts.encoder), "")
        if head is not None and moco_head:
            plan.match(_targets(_built_head(head, int(backbone.output.shape[-1]))), head_weights, "")
        else:
            for key in head_weights:
                report.ignored[key] = why_not_head.get(head_kind, "MoCo head: the target is a backbone")
        if parts.key_encoder is not None:
            for key in parts.key_encoder:
                report.ignored["encoder_k." + key] = "key encoder: the target is a backbone"
        for key in parts.buffers:
            report.ignored[key] = "MoCo queue: the target is a backbone"
        plan.apply()
    report.loaded = plan.loaded
    return report


# ---------------------------------------------------------------- moco_tf -> torch keys
#
# The inverse of the reading above, through the same key table (`_targets`): each torch key's
# Keras variable, brought back to torch's layout.

_TO_TORCH = {_same: _same, _conv_kernel: lambda x: np.transpose(x, (3, 2, 0, 1)), _dense_kernel: np.transpose}

def torch_state_dict(backbone: keras.Model, head: keras.Model | None = None) -> dict[str, np.ndarray]:
    """torchvision-named weights (numpy, torch layouts) of a moco_tf backbone and its MoCo head
    (`fc`, or `fc.0` and `fc.2`, as the official code names them)."""
    targets = dict(_targets(backbone))
    if head is not None:
        targets.update(_targets(_built_head(head, int(backbone.output.shape[-1]))))
    return {
        key: np.ascontiguousarray(_TO_TORCH[transform](np.asarray(variable, np.float32)))
        for key, (variable, transform) in targets.items()
    }
