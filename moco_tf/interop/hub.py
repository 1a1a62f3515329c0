"""Export a MoCo backbone as a reusable TF-Hub SavedModel (`python -m moco_tf.export`).

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
- the endpoints Keras 3's `TFSMLayer` needs to fine-tune (it cannot pass `training` to a
  SavedModel function, so each mode is a function of its own, images -> one output):
  `features` (BatchNorm in inference mode) and `features_training` (batch statistics, moving
  statistics updated), to be given as `call_endpoint` and `call_training_endpoint`; and
  `feature_maps_training`, the training-mode twin of `feature_maps`;
- with a fine-tuned classifier (`moco_tf.finetune`), `"logits"` in `serving_default` too;
- `assets/moco_config.json` describing the architecture, the MoCo run and the preprocessing.

Inputs follow the TF-Hub image convention: float32 RGB in [0, 1], shape [batch, height, width, 3],
any height and width. The ImageNet mean/std normalisation happens inside. Each weight is saved
once (the variables file is 4 bytes per value).

Writing never destroys what moco_tf did not write: an existing export_dir is replaced only when
it is a moco_tf export and overwrite was asked, never when it is, contains or lies inside the
model_dir (`check_export_target`), and the replacement is atomic (`moco_tf.atomic_write.replace`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import keras
import tensorflow as tf

from moco_tf.atomic_write import (
    Protected,
    TargetError,
    check_existing_folder,
    recover_leftovers,
    refuse_overlap,
    replace,
    scratch_folder,
)
from moco_tf.models.backbones import IMAGENET_MEAN, IMAGENET_STD, BackboneSpec
from moco_tf.training.checkpoint import config_values, restore_model
from moco_tf.weights.pretrained import CONFIG_ASSET

_IMAGES = tf.TensorSpec([None, None, None, 3], tf.float32, name="images")


class HubModule(tf.Module):
    """The exported object: normalisation + backbone (+ optional projection head).

    `variables` and `trainable_variables` are read-only properties on `tf.Module` that collect
    variables by walking attributes; Keras 3 variables are not `tf.Variable`s, so the walk would
    miss them. Shadowing the properties with class attributes lets us assign explicit lists of the
    underlying `tf.Variable`s, which is what `hub.KerasLayer` reads after loading.

    The Keras models are kept out of the SavedModel's object graph (`_Untracked`): tracked, each
    Keras variable is saved as an object of its own beside the `tf.Variable` it wraps, and the
    variables file held every weight twice. The traced functions capture the `tf.Variable`s,
    which the `variables` list tracks: each is saved once.
    """

    variables = None
    trainable_variables = None
    regularization_losses = None

    def __init__(
        self,
        backbone: keras.Model,
        head: keras.Model | None = None,
        config_file: str | None = None,
        classifier: keras.layers.Layer | None = None,
    ):
        super().__init__(name="moco_encoder")
        self._keras = _Untracked(backbone=backbone, head=head, maps=None, classifier=classifier)
        layers = [backbone] + [layer for layer in (head, classifier) if layer is not None]
        # Order is part of the format: the backbone's weights first, in `backbone.weights` order,
        # then the head's, then the classifier's (moco_tf.weights.pretrained rebuilds a Keras backbone
        # from an export this way).
        self.variables = [v.value for layer in layers for v in layer.weights]
        # The projection head is exported for inspection; fine-tuning touches the backbone only.
        self.trainable_variables = [v.value for v in backbone.trainable_weights]
        self.regularization_losses = []
        self._mean = tf.constant(IMAGENET_MEAN, tf.float32)
        self._std = tf.constant(IMAGENET_STD, tf.float32)
        if config_file is not None:
            self.config_file = tf.saved_model.Asset(config_file)
        # Keras 3 TFSMLayer endpoints: one function per BatchNorm mode (see the module docstring).
        # They call __call__'s traces (made first by export_backbone): no second trace of the network.
        self.features = tf.function(lambda images: self.__call__(images, training=False), input_signature=[_IMAGES])
        self.features_training = tf.function(
            lambda images: self.__call__(images, training=True), input_signature=[_IMAGES]
        )
        stages = stage_outputs(backbone)
        self.feature_maps = self.feature_maps_training = None
        if stages:
            # One Keras model over the same layers: one forward pass gives every stage's map.
            self._keras.maps = keras.Model(backbone.inputs, stages, name="feature_maps")
            self.feature_maps = tf.function(self._feature_maps, input_signature=[_IMAGES])
            self.feature_maps_training = tf.function(
                lambda images: self._feature_maps(images, training=True), input_signature=[_IMAGES]
            )

    def _features(self, images, training):
        x = (tf.convert_to_tensor(images, tf.float32) - self._mean) / self._std
        return self._keras.backbone(x, training=training)

    @tf.function
    def __call__(self, images, training=False):
        """images float32 [batch, h, w, 3] in [0, 1] -> pooled features [batch, 512 or 2048]."""
        return self._features(images, training)

    def _feature_maps(self, images, training=False):
        """The last block's output of each stage, for detection / segmentation backbones."""
        x = (images - self._mean) / self._std
        return self._keras.maps(x, training=training)

    @tf.function(input_signature=[_IMAGES])
    def serve(self, images):
        features = self._features(images, training=False)
        outputs = {"feature_vector": features}
        if self._keras.head is not None:
            outputs["projection"] = self._keras.head(features, training=False)
        if self._keras.classifier is not None:
            outputs["logits"] = self._keras.classifier(tf.cast(features, tf.float32), training=False)
        return outputs


class _Untracked:
    """A plain holder: tf.Module does not track what is inside it (see HubModule)."""

    def __init__(self, **members: Any):
        self.__dict__.update(members)


def export_backbone(
    backbone: keras.Model,
    export_dir: str,
    config: Mapping[str, Any],
    head: keras.Model | None = None,
    overwrite: bool = False,
    protected: Protected = (),
    overwrite_flag: str = "--overwrite",
    classifier: keras.layers.Layer | None = None,
) -> str:
    """Write `backbone` (images -> pooled features) as a TF-Hub reusable SavedModel.

    backbone: a `moco_tf.models.resnet` model taking ImageNet-normalised images, built without a fixed
        image size (`export_moco` rebuilds a training-time MoCo backbone so for you).
    export_dir: the folder to create. It is written in a staging folder next to it and renamed
        at the end, so an interrupted export leaves nothing half-written under export_dir.
    config: what the export should say about itself in `assets/moco_config.json` (arch, MoCo
        version, epochs, dataset, ...); the preprocessing contract is added here, and `width`
        (the ResNet's base channels, read off the backbone) when config does not give it.
    head: the MoCo projection head (`MoCo.encoder_q.head`); when given, `serving_default` also
        returns its output under "projection".
    overwrite: replace an existing moco_tf export at `export_dir`. Nothing else is ever replaced:
        not a folder that is no export, not an export holding other files, not `protected`.
    protected: paths the export must not be, contain or lie inside (the run's model_dir).
    overwrite_flag: the caller's flag that sets overwrite, named when an export exists.
    classifier: a Dense layer on the features (a fine-tuned head); `serving_default` then also
        returns its "logits". Fine-tuning through `hub.KerasLayer` still trains the backbone only.

    Returns export_dir. Raises atomic_write.TargetError (a FileExistsError) when export_dir may not
    be written (see `check_export_target`), atomic_write.DiskFullError when the disk fills up (the
    previous export, if any, stays as it was).
    """
    export_dir = os.path.normpath(export_dir)
    check_export_target(export_dir, overwrite, protected, overwrite_flag)

    def write(saved: str) -> None:
        config_path = os.path.join(scratch_folder(saved), CONFIG_ASSET)  # copied into assets/ by the save
        with open(config_path, "w") as f:
            json.dump(_full_config(backbone, config, head, classifier), f, indent=2, sort_keys=True)
        module = HubModule(backbone, head, config_path, classifier)
        # Trace both training values so hub.KerasLayer finds a function for each.
        module.__call__.get_concrete_function(_IMAGES, training=False)
        module.__call__.get_concrete_function(_IMAGES, training=True)
        signatures = {"serving_default": module.serve}
        if module.feature_maps is not None:
            signatures["feature_maps"] = module.feature_maps
        tf.saved_model.save(module, saved, signatures=signatures)

    replace(export_dir, write, lambda: _check_existing(export_dir, overwrite, overwrite_flag), what="export")
    return export_dir


def stage_outputs(backbone: keras.Model) -> dict[str, Any]:
    """{"layer1": ..., "layer4": ...}: the Keras tensors ending each ResNet stage (the last
    block's "layerS.N.out"); empty for a backbone without moco_tf.models.resnet's names."""
    last: dict[int, tuple[int, Any]] = {}
    for layer in backbone.layers:
        parts = layer.name.split(".")
        if len(parts) == 3 and parts[0].startswith("layer") and parts[2] == "out":
            stage, index = int(parts[0][5:]), int(parts[1])
            if index >= last.get(stage, (-1, None))[0]:
                last[stage] = (index, layer.output)
    return {f"layer{stage}": tensor for stage, (_, tensor) in sorted(last.items())}


# The marker in assets/moco_config.json that makes a folder a moco_tf export (read from its
# content, never its file names): only such a folder may be replaced by another export.
EXPORT_FORMAT = {"format": "moco_tf.export"}


def _full_config(backbone: keras.Model, config: Mapping[str, Any], head, classifier=None) -> dict[str, Any]:
    full = {**config, **EXPORT_FORMAT}
    full.setdefault("feature_dim", int(backbone.output.shape[-1]))
    width = _backbone_width(backbone)
    if width is not None:
        full.setdefault("width", width)
    if head is not None:
        full.setdefault("projection_dim", int(head.layers[-1].units))
    full.setdefault("mean", list(IMAGENET_MEAN))  # what HubModule normalises with
    full.setdefault("std", list(IMAGENET_STD))
    full["preprocessing"] = {
        "input": "float32 RGB in [0, 1], shape [batch, height, width, 3], any height and width",
        "normalization": "inside the model: (x - mean) / std",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "eval_transform": "resize shorter side to 256, center crop 224 (the linear protocol's)",
    }
    if classifier is not None:
        full.setdefault("num_classes", int(classifier.units))
    serving = ["feature_vector"] + (["projection"] if head else []) + (["logits"] if classifier else [])
    full["signatures"] = {"serving_default": serving}
    # TFSMLayer endpoints (attributes, not signatures): call_endpoint / call_training_endpoint pairs.
    full["keras3_endpoints"] = {"features": "features_training"}
    stages = stage_outputs(backbone)
    if stages:
        full["signatures"]["feature_maps"] = sorted(stages)
        full["keras3_endpoints"]["feature_maps"] = "feature_maps_training"
    return full


def _backbone_width(backbone: keras.Model) -> int | None:
    """A moco_tf.models.resnet's base channels: the output channels of its first conv ("conv1")."""
    try:
        return int(backbone.get_layer("conv1").filters)
    except (ValueError, AttributeError):  # not a moco_tf.models.resnet
        return None


# ----------------------------------------------------------------------------------------------
# where an export may be written (the rules and the replacement itself: moco_tf.atomic_write)

# What a SavedModel folder holds; an export with anything else in it is not replaced.
SAVED_MODEL_ENTRIES = frozenset({"saved_model.pb", "fingerprint.pb", "variables", "assets", "assets.extra"})


def is_export(path: str) -> bool:
    """Whether `path` is a folder written by moco_tf.export: a SavedModel whose
    assets/moco_config.json carries moco_tf's export marker (its content, not only its names)."""
    if not (os.path.isdir(path) and os.path.isfile(os.path.join(path, "saved_model.pb"))):
        return False
    try:
        with open(os.path.join(path, "assets", CONFIG_ASSET), "rb") as f:
            values = json.loads(f.read(1 << 20).decode("utf-8"))
    except (OSError, ValueError):  # absent, unreadable, not UTF-8 JSON (or larger than ours ever are)
        return False
    return isinstance(values, dict) and values.get("format") == EXPORT_FORMAT["format"]


def _is_complete_export(path: str) -> bool:
    return is_export(path) and os.path.isfile(os.path.join(path, "variables", "variables.index"))


def export_source(export_dir: str) -> str | None:
    """The "source" an existing moco_tf export records in its moco_config.json (e.g.
    "moco_tf model_dir /abs/run"); None when export_dir is no export or records none."""
    if not is_export(export_dir):
        return None
    try:
        source = read_config(export_dir).get("source")
    except (OSError, ValueError, AttributeError):  # unreadable or not a JSON object
        return None
    return source if isinstance(source, str) else None


def check_export_target(
    export_dir: str, overwrite: bool = False, protected: Protected = (), overwrite_flag: str = "--overwrite"
) -> None:
    """Raise TargetError (one line) unless an export may be written at `export_dir`.

    Allowed: a path that does not exist or an empty folder; an existing moco_tf export when
    `overwrite`. Refused whatever `overwrite` says: export_dir being, containing or lying inside
    one of `protected` (e.g. the run's model_dir), containing the current directory, a file, a
    symbolic link, a folder that is not a moco_tf export, an export holding other files too.

    Cheap; call it before a long run (training) and it is called again by export_backbone. It also
    tidies up after an export that was killed: a leftover staging folder of ours beside export_dir
    is removed, and if export_dir is missing because the kill came in the middle of a replacement,
    the previous export is put back first.
    """
    if not export_dir:
        raise TargetError("no export_dir given")
    refuse_overlap(export_dir, protected, "export_dir")
    recover_leftovers(export_dir, _is_complete_export)
    _check_existing(export_dir, overwrite, overwrite_flag)


def _check_existing(export_dir: str, overwrite: bool, overwrite_flag: str = "--overwrite") -> None:
    check_existing_folder(
        export_dir, overwrite, is_export, SAVED_MODEL_ENTRIES, "an export",
        f"a moco_tf export (no saved_model.pb and assets/{CONFIG_ASSET})", "a moco_tf export", overwrite_flag,
    )


def read_config(export_dir: str) -> dict[str, Any]:
    """The `assets/moco_config.json` of an export."""
    with open(os.path.join(export_dir, "assets", CONFIG_ASSET)) as f:
        return json.load(f)


def export_moco(
    model: keras.Model,
    export_dir: str,
    config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    protected: Protected = (),
    overwrite_flag: str = "--overwrite",
) -> str:
    """Export a `moco_tf.MoCo` model's query backbone and projection head (e.g. after training).

    The backbone is rebuilt with any input size and plain BatchNorm (bn_groups=1) and given the
    trained weights: a training-time backbone may fix its image size (static shapes) and split
    BN into groups, neither of which suits a consumer fine-tuning at its own size and batch.
    config: extra entries for moco_config.json (MoCo version, epochs, dataset, ...).
    overwrite, protected, overwrite_flag: as in `export_backbone` (protected: the run's model_dir).
    """
    check_export_target(export_dir, overwrite, protected, overwrite_flag)  # before rebuilding the backbone
    spec = BackboneSpec(model.arch, model.width, model.cifar_stem)
    backbone = spec.build()
    backbone.set_weights(model.backbone_q.get_weights())
    full = {**spec.to_dict(), "feature_dim": spec.feature_dim, "mean": list(spec.mean), "std": list(spec.std),
            "mlp": model.mlp, "dim": model.dim}
    full.update(config or {})
    return export_backbone(
        backbone, export_dir, full, head=model.encoder_q.head, overwrite=overwrite, protected=protected,
        overwrite_flag=overwrite_flag,
    )


def export_model_dir(model_dir: str, export_dir: str, overwrite: bool = False) -> str:
    """Export the query backbone (and head) of the MoCo model saved in `model_dir`: a moco_tf
    model_dir (its newest checkpoint) or one checkpoint prefix in it (`DIR/checkpoints/ckpt-12`).

    export_dir may not be, contain or lie inside the model_dir (see `check_export_target`).
    """
    model_dir = os.path.normpath(model_dir)
    prefix = not os.path.isdir(model_dir) and os.path.isfile(model_dir + ".index")
    if prefix:
        # The checkpoint's folder and the run's model_dir (restore_model reads its config.json).
        protected = {
            os.path.dirname(model_dir) or ".": "the checkpoints folder",
            os.path.dirname(os.path.dirname(model_dir)) or ".": "the model_dir",
        }
    else:
        protected = {model_dir: "the model_dir"}
    check_export_target(export_dir, overwrite, protected)  # before the slow restore
    if not prefix and not os.path.isdir(model_dir):
        if os.path.exists(model_dir):
            raise NotADirectoryError(
                f"model_dir {model_dir} is a file: give a moco_tf model_dir or a checkpoint prefix (DIR/ckpt-N)"
            )
        raise FileNotFoundError(
            f"model_dir {model_dir} does not exist (neither a folder nor a checkpoint prefix with a .index file)"
        )
    model, config = restore_model(model_dir)
    run_dir = list(protected)[-1]
    config = {**config_values(config), "source": f"moco_tf model_dir {os.path.abspath(run_dir)}"}
    if prefix:
        config["checkpoint"] = os.path.basename(model_dir)
    return export_moco(model, export_dir, config, overwrite=overwrite, protected=protected)
