"""Export a MoCo backbone as a reusable TF-Hub SavedModel.

    python -m moco_tf.export --model_dir=DIR --export_dir=export/NAME [--overwrite]

Keras 3's `model.export()` alone cannot be fine-tuned through `hub.KerasLayer(trainable=True)`:
it has no `__call__` with a `training` argument and no `regularization_losses`. The export is
therefore a `tf.Module` following the TF-Hub reusable SavedModel convention:

- `__call__(images, training=False)`, traced for both values of `training` (BatchNorm uses batch
  statistics and updates its moving statistics when `training=True`);
- `variables`, `trainable_variables`, `regularization_losses` (empty: weight decay is the
  optimizer's job, as in PyTorch);
- a `serving_default` signature returning `{"feature_vector": [batch, 512 or 2048]}` (at the
  standard width 64; 8 or 32 x `width` for a narrower ResNet) (and
  `"projection"` when the MoCo head is exported too);
- a `feature_maps` signature returning each stage's last block output `{"layer1", ..., "layer4"}`
  (strides 4, 8, 16, 32; 1, 2, 4, 8 with the CIFAR stem) for detection-style backbones;
- `assets/moco_config.json` describing the architecture, the MoCo run and the preprocessing.

Inputs follow the TF-Hub image convention: float32 RGB in [0, 1], shape [batch, height, width, 3],
any height and width. The ImageNet mean/std normalisation happens inside.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import keras
import tensorflow as tf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CONFIG_ASSET = "moco_config.json"

_IMAGES = tf.TensorSpec([None, None, None, 3], tf.float32, name="images")


class HubModule(tf.Module):
    """The exported object: normalisation + backbone (+ optional projection head).

    `variables` and `trainable_variables` are read-only properties on `tf.Module` that collect
    variables by walking attributes; Keras 3 variables are not `tf.Variable`s, so the walk would
    miss them. Shadowing the properties with class attributes lets us assign explicit lists of the
    underlying `tf.Variable`s, which is what `hub.KerasLayer` reads after loading.
    """

    variables = None
    trainable_variables = None
    regularization_losses = None

    def __init__(
        self,
        backbone: keras.Model,
        head: keras.Model | None = None,
        config_file: str | None = None,
    ):
        super().__init__(name="moco_encoder")
        self._backbone = backbone
        self._head = head
        layers = [backbone] + ([head] if head is not None else [])
        # Order is part of the format: the backbone's weights first, in `backbone.weights` order,
        # then the head's (moco_tf.pretrained rebuilds a Keras backbone from an export this way).
        self.variables = [v.value for layer in layers for v in layer.weights]
        # The projection head is exported for inspection; fine-tuning touches the backbone only.
        self.trainable_variables = [v.value for v in backbone.trainable_weights]
        self.regularization_losses = []
        self._mean = tf.constant(IMAGENET_MEAN, tf.float32)
        self._std = tf.constant(IMAGENET_STD, tf.float32)
        if config_file is not None:
            self.config_file = tf.saved_model.Asset(config_file)
        stages = stage_outputs(backbone)
        self.feature_maps = None
        if stages:
            # One Keras model over the same layers: one forward pass gives every stage's map.
            self._maps = keras.Model(backbone.inputs, stages, name="feature_maps")
            self.feature_maps = tf.function(self._feature_maps, input_signature=[_IMAGES])

    def _features(self, images, training):
        x = (tf.convert_to_tensor(images, tf.float32) - self._mean) / self._std
        return self._backbone(x, training=training)

    @tf.function
    def __call__(self, images, training=False):
        """images float32 [batch, h, w, 3] in [0, 1] -> pooled features [batch, 512 or 2048]."""
        return self._features(images, training)

    def _feature_maps(self, images):
        """The last block's output of each stage, for detection / segmentation backbones."""
        x = (images - self._mean) / self._std
        return self._maps(x, training=False)

    @tf.function(input_signature=[_IMAGES])
    def serve(self, images):
        features = self._features(images, training=False)
        outputs = {"feature_vector": features}
        if self._head is not None:
            outputs["projection"] = self._head(features, training=False)
        return outputs


def export_backbone(
    backbone: keras.Model,
    export_dir: str,
    config: Mapping[str, Any],
    head: keras.Model | None = None,
    overwrite: bool = False,
) -> str:
    """Write `backbone` (images -> pooled features) as a TF-Hub reusable SavedModel.

    backbone: a `moco_tf.resnet` model taking ImageNet-normalised images, built without a fixed
        image size (`export_moco` rebuilds a training-time MoCo backbone so for you).
    export_dir: the folder to create. It is written under a temporary name next to it and renamed
        at the end, so an interrupted export leaves nothing half-written.
    config: what the export should say about itself in `assets/moco_config.json` (arch, MoCo
        version, epochs, dataset, ...); the preprocessing contract is added here, and `width`
        (the ResNet's base channels, read off the backbone) when config does not give it.
    head: the MoCo projection head (`MoCo.encoder_q.head`); when given, `serving_default` also
        returns its output under "projection".
    overwrite: replace an existing `export_dir`; without it an existing folder is an error.

    Returns export_dir. Raises FileExistsError when export_dir exists and overwrite is False.
    """
    export_dir = os.path.normpath(export_dir)
    if os.path.exists(export_dir) and not overwrite:
        raise FileExistsError(f"export {export_dir} already exists; pass overwrite=True (--overwrite)")
    parent = os.path.dirname(os.path.abspath(export_dir))
    os.makedirs(parent, exist_ok=True)
    name = os.path.basename(export_dir)
    # Same parent folder, so the final rename stays on one filesystem and is atomic.
    staging = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent)
    try:
        saved = os.path.join(staging, "saved_model")
        config_path = os.path.join(staging, CONFIG_ASSET)
        with open(config_path, "w") as f:
            json.dump(_full_config(backbone, config, head), f, indent=2, sort_keys=True)
        module = HubModule(backbone, head, config_path)
        # Trace both training values so hub.KerasLayer finds a function for each.
        module.__call__.get_concrete_function(_IMAGES, training=False)
        module.__call__.get_concrete_function(_IMAGES, training=True)
        signatures = {"serving_default": module.serve}
        if module.feature_maps is not None:
            signatures["feature_maps"] = module.feature_maps
        tf.saved_model.save(module, saved, signatures=signatures)
        _replace(saved, export_dir, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return export_dir


def stage_outputs(backbone: keras.Model) -> dict[str, Any]:
    """{"layer1": ..., "layer4": ...}: the Keras tensors ending each ResNet stage (the last
    block's "layerS.N.out"); empty for a backbone without moco_tf.resnet's names."""
    last: dict[int, tuple[int, Any]] = {}
    for layer in backbone.layers:
        parts = layer.name.split(".")
        if len(parts) == 3 and parts[0].startswith("layer") and parts[2] == "out":
            stage, index = int(parts[0][5:]), int(parts[1])
            if index >= last.get(stage, (-1, None))[0]:
                last[stage] = (index, layer.output)
    return {f"layer{stage}": tensor for stage, (_, tensor) in sorted(last.items())}


def _full_config(backbone: keras.Model, config: Mapping[str, Any], head) -> dict[str, Any]:
    full = dict(config)
    full.setdefault("feature_dim", int(backbone.output.shape[-1]))
    width = _backbone_width(backbone)
    if width is not None:
        full.setdefault("width", width)
    if head is not None:
        full.setdefault("projection_dim", int(head.layers[-1].units))
    full["preprocessing"] = {
        "input": "float32 RGB in [0, 1], shape [batch, height, width, 3], any height and width",
        "normalization": "inside the model: (x - mean) / std",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "eval_transform": "resize shorter side to 256, center crop 224 (the linear protocol's)",
    }
    full["signatures"] = {"serving_default": ["feature_vector"] + (["projection"] if head else [])}
    stages = stage_outputs(backbone)
    if stages:
        full["signatures"]["feature_maps"] = sorted(stages)
    return full


def _backbone_width(backbone: keras.Model) -> int | None:
    """A moco_tf.resnet's base channels: the output channels of its first conv ("conv1")."""
    try:
        return int(backbone.get_layer("conv1").filters)
    except (ValueError, AttributeError):  # not a moco_tf.resnet
        return None


def _replace(src: str, dst: str, overwrite: bool) -> None:
    """Move src to dst; with overwrite, the old dst disappears only once src is in place."""
    if not os.path.exists(dst):
        os.rename(src, dst)
        return
    if not overwrite:
        raise FileExistsError(f"export {dst} already exists; pass overwrite=True (--overwrite)")
    old = src + ".old"
    os.rename(dst, old)
    os.rename(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def read_config(export_dir: str) -> dict[str, Any]:
    """The `assets/moco_config.json` of an export."""
    with open(os.path.join(export_dir, "assets", CONFIG_ASSET)) as f:
        return json.load(f)


def export_moco(
    model: keras.Model, export_dir: str, config: Mapping[str, Any] | None = None, overwrite: bool = False
) -> str:
    """Export a `moco_tf.MoCo` model's query backbone and projection head (e.g. after training).

    The backbone is rebuilt with any input size and plain BatchNorm (bn_groups=1) and given the
    trained weights: a training-time backbone may fix its image size (static shapes) and split
    BN into groups, neither of which suits a consumer fine-tuning at its own size and batch.
    config: extra entries for moco_config.json (MoCo version, epochs, dataset, ...).
    """
    from moco_tf.resnet import resnet

    backbone = resnet(model.arch, cifar_stem=model.cifar_stem, width=model.width)
    backbone.set_weights(model.backbone_q.get_weights())
    # export_backbone records the width (and feature_dim) read off the backbone itself.
    full = {"arch": model.arch, "cifar_stem": model.cifar_stem, "mlp": model.mlp, "dim": model.dim}
    full.update(config or {})
    return export_backbone(backbone, export_dir, full, head=model.encoder_q.head, overwrite=overwrite)


def export_model_dir(model_dir: str, export_dir: str, overwrite: bool = False) -> str:
    """Export the query backbone (and head) of the MoCo model saved in `model_dir`."""
    if os.path.exists(export_dir) and not overwrite:  # before the slow restore
        raise FileExistsError(f"export {export_dir} already exists; pass overwrite=True (--overwrite)")
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model_dir {model_dir} does not exist")
    from moco_tf.checkpoint import restore_model

    model, config = restore_model(model_dir)
    config = {**config, "source": f"moco_tf model_dir {os.path.abspath(model_dir)}"}
    return export_moco(model, export_dir, config, overwrite=overwrite)


# User mistakes the CLIs report in one line instead of a traceback.
USER_ERRORS = (FileExistsError, FileNotFoundError, NotADirectoryError, ValueError)


def _main(argv) -> None:
    from absl import flags

    from moco_tf import cli

    FLAGS = flags.FLAGS
    cli.reject_extra_arguments(argv)
    if not FLAGS.model_dir or not FLAGS.export_dir:
        raise ValueError("both --model_dir and --export_dir are required")
    path = export_model_dir(FLAGS.model_dir, FLAGS.export_dir, overwrite=FLAGS.overwrite)
    print(f"exported {path}")


def run_cli(main, argv=None, user_errors: tuple[type[BaseException], ...] = ()) -> None:
    """`moco_tf.cli.run` with this module's user mistakes (ValueError included) reported in one line."""
    from moco_tf import cli

    cli.run(main, user_errors=USER_ERRORS + user_errors, argv=argv)


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("model_dir", None, "moco_tf model_dir to export (written by training)")
    flags.DEFINE_string("export_dir", None, "folder to create, e.g. export/moco_v2_r50")
    flags.DEFINE_bool("overwrite", False, "replace an existing export_dir")


if __name__ == "__main__":
    _define_flags()
    run_cli(_main)
