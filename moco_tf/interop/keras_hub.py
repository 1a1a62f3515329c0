"""A moco_tf encoder as a KerasHub preset folder (`python -m moco_tf.export --format=keras_hub`).

The folder is timm's layout, which KerasHub's `ResNetBackbone.from_preset(DIR)` and
`ImageClassifier.from_preset(DIR, num_classes=N)` read as they are (keras_hub's
`utils/timm/convert_resnet.py`):

- `config.json`: {"architecture": "resnet50", "num_features", "pretrained_cfg": {"input_size",
  "mean", "std", "interpolation", "crop_pct"}, "moco_tf": {...how it was made...}};
- `model.safetensors`: the backbone in torchvision's key names and torch layouts (the same table
  as `moco_tf.weights.torch_checkpoint`). The MoCo projection head is left out: KerasHub has no place for
  it, and transfer starts from the pooled features.

Preprocessing: `mean` / `std` are moco_tf's (ImageNet), for pixels scaled to [0, 1] (timm's
convention, and a moco_tf export's input). KerasHub's ImageConverter built from them takes
0-255 images and computes (x / 255 - mean) / std, the same normalisation.

KerasHub's ResNetBackbone is torchvision's layout at width 64 with the ImageNet stem; a narrower
ResNet or the CIFAR stem cannot be written (refused in one line).
"""

from __future__ import annotations

import json
import os

from moco_tf.atomic_write import TargetError, check_existing_folder, recover_leftovers, refuse_overlap, replace
from moco_tf.interop.targets import require
from moco_tf.interop.transfer import Encoder
from moco_tf.models.backbones import BackboneSpec
from moco_tf.weights.torch_checkpoint import torch_state_dict

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
PRESET_ENTRIES = frozenset({CONFIG_FILE, WEIGHTS_FILE})
MARKER = "moco_tf"  # the config.json entry that says moco_tf wrote the preset
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")  # what convert_resnet.py maps


def check_representable(spec: BackboneSpec) -> None:
    """Refuse, in one line, what KerasHub's ResNetBackbone cannot represent."""
    why = None
    if spec.cifar_stem:
        why = "it has the CIFAR stem (3x3 stride-1 conv, no max-pool), and KerasHub's ResNet has the ImageNet stem only"
    elif spec.width != 64:
        why = f"its width is {spec.width} and KerasHub's ResNet has width 64 only"
    elif spec.arch not in ARCHS:
        why = f"KerasHub's timm converter has no {spec.arch}"
    if why:
        raise TargetError(
            f"cannot write a {spec.label}{' (CIFAR stem)' if spec.cifar_stem else ''} as a KerasHub preset: {why}; "
            "use --format=hub (Keras 3 through TFSMLayer / TF-Hub) or --format=pth instead"
        )


def is_preset(path: str) -> bool:
    """Whether `path` is a preset folder written by moco_tf: config.json with the moco_tf entry."""
    try:
        with open(os.path.join(path, CONFIG_FILE)) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get(MARKER), dict)


def check_target(target: str, overwrite: bool = False, protected=(), overwrite_flag: str = "--overwrite") -> None:
    """The export rules for a preset folder: new, empty, or (with overwrite) a moco_tf preset
    holding nothing else; never what the source is, contains or lies inside."""
    if not target:
        raise TargetError("no export_dir given")
    refuse_overlap(target, protected, "export_dir")
    recover_leftovers(target, lambda path: is_preset(path) and os.path.isfile(os.path.join(path, WEIGHTS_FILE)))
    _check_existing(target, overwrite, overwrite_flag)


def _check_existing(target: str, overwrite: bool, overwrite_flag: str = "--overwrite") -> None:
    check_existing_folder(
        target, overwrite, is_preset, PRESET_ENTRIES, "a KerasHub preset",
        "a KerasHub preset written by moco_tf", "the preset", overwrite_flag,
    )


def preset_config(encoder: Encoder) -> dict:
    spec = encoder.spec
    size = 224
    recorded = ("source", "moco_version", "epochs", "dataset")
    made = {k: encoder.config[k] for k in recorded if encoder.config.get(k) is not None}
    return {
        "architecture": spec.arch,
        "num_classes": 0,  # a backbone: ImageClassifier.from_preset(DIR, num_classes=N) adds a new head
        "num_features": spec.feature_dim,
        "global_pool": "avg",
        "pretrained_cfg": {
            "input_size": [3, size, size],
            "interpolation": "bilinear",
            "crop_pct": 0.875,  # resize the shorter side to 256, center crop 224
            "mean": list(spec.mean),
            "std": list(spec.std),
            "first_conv": "conv1",
            "classifier": "fc",
        },
        MARKER: {
            "format": "KerasHub preset (timm layout): torchvision ResNet weights in model.safetensors",
            "preprocessing": "mean/std for pixels in [0, 1]; KerasHub's ImageConverter takes 0-255 images "
            "and computes (x / 255 - mean) / std",
            "projection_head": "left out (MoCo's head is for pretraining only)",
            **made,
        },
    }


def write_preset(encoder: Encoder, target: str, overwrite: bool = False) -> str:
    """Write `encoder`'s backbone as a KerasHub preset folder at `target` (staging + atomic rename)."""
    check_representable(encoder.spec)
    require("keras_hub", "keras_hub", "--format=keras_hub")
    safetensors_numpy = require("safetensors.numpy", "keras_hub", "--format=keras_hub")
    target = os.path.normpath(target)
    check_target(target, overwrite, encoder.protected)
    tensors = torch_state_dict(encoder.backbone)  # no head: see the module docstring
    config = preset_config(encoder)

    def write(path: str) -> None:
        os.makedirs(path)
        safetensors_numpy.save_file(tensors, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})
        with open(os.path.join(path, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(os.path.join(path, WEIGHTS_FILE), 0o666 & ~umask)  # safetensors creates it 0600

    replace(target, write, lambda: _check_existing(target, overwrite), what="KerasHub preset")
    return target
