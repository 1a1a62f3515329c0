"""A moco_tf encoder as an ONNX model (`python -m moco_tf.export --format=onnx`), through tf2onnx.

One graph, one forward pass, the outputs of the TF-Hub export's two signatures together:
- input `images`: float32 RGB in [0, 1], [batch, height, width, 3], batch, height and width dynamic
  (the ImageNet mean/std normalisation is inside, as in the TF-Hub export);
- outputs `feature_vector` [batch, 512 or 2048] (and `projection` with a MoCo head): the
  export's `serving_default`; `layer1` ... `layer4` (NHWC, strides 4 to 32): its `feature_maps`.

ONNX opset 17 (`OPSET`). The model's metadata_props hold `moco_tf` (a JSON description of the
encoder): how an existing .onnx is recognised as moco_tf's own, the only kind `--overwrite`
replaces.
"""

from __future__ import annotations

import json
import os

import keras
import tensorflow as tf

from moco_tf.atomic_write import check_existing_file, replace
from moco_tf.interop.hub import stage_outputs
from moco_tf.interop.targets import check_file_target, require
from moco_tf.interop.transfer import Encoder

OPSET = 17
MARKER = "moco_tf"
WHAT = "ONNX model"


def is_moco_tf_onnx(path: str) -> bool:
    """Whether `path` is an ONNX model written by moco_tf (its `moco_tf` metadata entry)."""
    try:
        import onnx

        model = onnx.load(path, load_external_data=False)
    except Exception:  # not ONNX (or no onnx installed): not ours
        return False
    return any(prop.key == MARKER for prop in model.metadata_props)


def check_target(path: str, overwrite: bool = False, protected=()) -> None:
    _require_all()
    check_file_target(path, overwrite, protected, is_moco_tf_onnx, WHAT)


def _require_all():
    tf2onnx = require("tf2onnx", "onnx", "--format=onnx")
    onnx = require("onnx", "onnx", "--format=onnx")
    return tf2onnx, onnx


def serving_function(encoder: Encoder) -> tf.types.experimental.GenericFunction:
    """[0, 1] images -> {"feature_vector", "projection"?, "layer1".."layer4"} in one forward pass."""
    backbone, head = encoder.backbone, encoder.head
    outputs = {"feature_vector": backbone.output, **stage_outputs(backbone)}
    model = keras.Model(backbone.inputs, outputs, name="moco_onnx")
    mean, std = list(encoder.spec.mean), list(encoder.spec.std)  # constants of the graph, not captured inputs

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="images")])
    def serve(images):
        result = dict(model((images - mean) / std, training=False))
        if head is not None:
            result["projection"] = head(result["feature_vector"], training=False)
        return result

    return serve


def write_onnx(encoder: Encoder, path: str, overwrite: bool = False) -> str:
    """Write `encoder` as an ONNX model file at `path` (staging + atomic rename)."""
    tf2onnx, onnx = _require_all()
    path = os.path.normpath(path)
    check_target(path, overwrite, encoder.protected)
    function = serving_function(encoder)
    proto, _ = tf2onnx.convert.from_function(function, input_signature=function.input_signature, opset=OPSET)
    description = {
        "format": "moco_tf encoder: images float32 RGB [0, 1] NHWC -> feature_vector (+ projection), layer1..layer4",
        **encoder.spec.to_dict(),
        "feature_dim": encoder.spec.feature_dim,
        "mean": list(encoder.spec.mean),
        "std": list(encoder.spec.std),
        "opset": OPSET,
    }
    for key in ("source", "moco_version", "epochs", "dataset"):
        if encoder.config.get(key) is not None:
            description[key] = encoder.config[key]
    entry = proto.metadata_props.add()
    entry.key, entry.value = MARKER, json.dumps(description, sort_keys=True)
    proto.producer_name = "moco_tf (tf2onnx)"
    replace(
        path,
        lambda new: onnx.save(proto, new),
        lambda: check_existing_file(path, overwrite, is_moco_tf_onnx, WHAT),
        what=WHAT,
    )
    return path
