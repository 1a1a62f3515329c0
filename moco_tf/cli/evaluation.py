"""What the evaluation command lines (knn, lincls) share: the strategy, the dtype policy and the
pretrained encoder on them, from the flags of knn, lincls and finetune."""

from __future__ import annotations

import dataclasses
import json
import os
import random
from typing import Any

import keras
import tensorflow as tf

from moco_tf import atomic_write, outputs
from moco_tf.data.sources import Source
from moco_tf.evaluation.frozen import FrozenBackbone, replicate
from moco_tf.evaluation.linear import read_results_file, results_kind
from moco_tf.models.backbones import BackboneSpec
from moco_tf.training import distribute
from moco_tf.training.config import FORMAT_VERSION, PRECISION_POLICIES, ConfigError, check_same_run
from moco_tf.training.evaluation_config import FinetuneConfig, LinearConfig
from moco_tf.weights.pretrained import load_backbone, load_for_evaluation


@dataclasses.dataclass
class Setup:
    strategy: tf.distribute.Strategy
    chief: bool  # the one process of a cluster that writes files
    backbone: FrozenBackbone
    info: dict[str, Any]
    source: Source


def setup(flag_values: Any, config: Any = None) -> Setup:
    """The strategy (made first: multi-worker collectives must be set up before any TF op), then
    the encoder of --pretrained, rebuilt in the strategy's scope under --mixed_precision's policy
    when either applies, and the labelled data source. `config` (a LinearConfig: its recipe's
    values) gives pretrained, dataset, data_dir and strict_data; without one, the flags do."""
    data = config if config is not None else flag_values
    strategy = distribute.make_strategy(flag_values.strategy, flag_values.tpu, flag_values.peer_timeout)
    backbone, info, source = load_for_evaluation(data.pretrained, data.dataset, data.data_dir, data.strict_data)
    if strategy is not tf.distribute.get_strategy() or flag_values.mixed_precision != "none":
        keras.mixed_precision.set_global_policy(PRECISION_POLICIES[flag_values.mixed_precision])
        backbone = replicate(backbone, BackboneSpec.from_dict(info).build, strategy)
    return Setup(strategy, distribute.is_chief(strategy), backbone, info, source)


def load_reference(path: str) -> FrozenBackbone:
    """--pretrained loaded again as it is stored, in float32 whatever --mixed_precision set: the
    linear protocol's final check compares the backbone it used with this one."""
    keras.mixed_precision.set_global_policy("float32")
    return load_backbone(path)[0]


def shared_seed(strategy: tf.distribute.Strategy, seed: int | None) -> int | None:
    """`seed`, or with several workers and no seed one drawn by the chief: each worker reads the
    whole data in the same shuffled order and keeps its part, so the orders must agree."""
    if seed is not None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return seed
    with strategy.scope():  # a variable made in scope starts with the chief's value on every worker
        drawn = tf.Variable(random.SystemRandom().randrange(2**31), dtype=tf.int64, trainable=False)
    return int(drawn.numpy())


def is_own_model_dir(model_dir: str, config_file: str) -> bool:
    """Whether model_dir already holds this command's config_file with moco_tf's format marker:
    only then may a resume move files in it (a broken checkpoint into broken/). Call it before
    `check_model_dir`, which writes that file for a new run."""
    try:
        with tf.io.gfile.GFile(os.path.join(model_dir, config_file), "rb") as f:
            values = json.loads(f.read().decode("utf-8"))
    except (OSError, tf.errors.OpError, UnicodeDecodeError, ValueError):  # absent, unreadable or not JSON
        return False
    return isinstance(values, dict) and values.get("format_version") == FORMAT_VERSION


def _read_config(config_type: type, path: str) -> LinearConfig | FinetuneConfig:
    """The run config at `path`, its values within the bounds of their flags; a one-line error
    naming the file when it is garbled or not moco_tf's."""
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            saved = config_type.from_json(f.read().decode("utf-8"))
        saved._validate_common()
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a moco_tf config (not UTF-8 text); use another --model_dir") from None
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}; restore it or use another --model_dir") from None
    return saved


def check_model_dir_first(
    model_dir: str | None, command: str, config_type: type, config_file: str, results_file: str, final_file: str
) -> None:
    """Before anything is loaded or built: refuses a --model_dir that is a file, a run of another
    command (its config file, e.g. a pretraining run's config.json), checkpoints without this
    command's config (another project's), a config file or results that are garbled or not moco_tf's,
    and a final-results path holding a file moco_tf did not write."""
    if not model_dir or "://" in model_dir or not os.path.exists(model_dir):
        return
    if not os.path.isdir(model_dir):
        raise ConfigError(f"--model_dir={model_dir} is not a folder")
    for name, other in outputs.RUN_CONFIG_FILES.items():
        if other != command and os.path.exists(os.path.join(model_dir, name)):
            raise ConfigError(
                f"--model_dir={model_dir} holds {name} (the file of a {other} run), so it is not a {command} run; "
                "use another --model_dir"
            )
    own = os.path.join(model_dir, config_file)
    if os.path.exists(own):
        _read_config(config_type, own)
    elif os.path.exists(os.path.join(model_dir, "checkpoint")) or os.path.isdir(os.path.join(model_dir, "checkpoints")):
        raise ConfigError(
            f"--model_dir={model_dir} holds checkpoints but no moco_tf {config_file}: not touching them; "
            "use another --model_dir"
        )
    read_results_file(os.path.join(model_dir, results_file))
    final = os.path.join(model_dir, final_file)
    outputs.check_output(final, "the results file", results_kind(final))


def check_model_dir(config: LinearConfig | FinetuneConfig, config_file: str, chief: bool) -> None:
    """Refuses to resume a run of another recipe (on every worker); the chief records a new run's
    config as model_dir/config_file (atomically)."""
    path = os.path.join(config.model_dir, config_file)
    if tf.io.gfile.exists(path):
        check_same_run(_read_config(type(config), path), config, config.model_dir)
        return
    if chief:
        atomic_write.write_atomic(path, config.to_json().encode())
