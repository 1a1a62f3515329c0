"""What the evaluation command lines (knn, lincls) share: the strategy, the dtype policy and the
pretrained encoder on them, from the flags of `define_evaluation_flags`."""

from __future__ import annotations

import dataclasses
from typing import Any

import keras
import tensorflow as tf

from moco_tf.data.sources import Source
from moco_tf.evaluation.frozen import FrozenBackbone, is_distributed, replicate
from moco_tf.interop.pretrained import load_backbone, load_for_evaluation
from moco_tf.models.resnet import resnet
from moco_tf.training import distribute

POLICIES = {"none": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


@dataclasses.dataclass
class Setup:
    strategy: tf.distribute.Strategy
    chief: bool  # the one process of a cluster that writes files
    backbone: FrozenBackbone
    info: dict[str, Any]
    source: Source


def setup(flag_values: Any) -> Setup:
    """The strategy (made first: multi-worker collectives must be set up before any TF op), then
    the encoder of --pretrained, rebuilt in the strategy's scope under --mixed_precision's policy
    when either applies, and the labelled data source."""
    strategy = distribute.make_strategy(flag_values.strategy, flag_values.tpu, flag_values.peer_timeout)
    backbone, info, source = load_for_evaluation(
        flag_values.pretrained, flag_values.dataset, flag_values.data_dir, flag_values.strict_data
    )
    if is_distributed(strategy) or flag_values.mixed_precision != "none" or flag_values.strategy == "tpu":
        keras.mixed_precision.set_global_policy(POLICIES[flag_values.mixed_precision])
        build = lambda: resnet(info["arch"], cifar_stem=info["cifar_stem"], width=info["width"])  # noqa: E731
        backbone = replicate(backbone, build, strategy)
    return Setup(strategy, distribute.is_chief(strategy), backbone, info, source)


def load_reference(path: str) -> FrozenBackbone:
    """--pretrained loaded again as it is stored, in float32 whatever --mixed_precision set: the
    linear protocol's final check compares the backbone it used with this one."""
    keras.mixed_precision.set_global_policy("float32")
    return load_backbone(path)[0]
