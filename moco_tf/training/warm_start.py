"""Starting a new run from existing weights (--init_from), and extending a finished run's epochs.

init_from: both encoders (query and key: the key encoder is a copy of the query one at step 0,
as in a run from scratch) take the source's backbone, and its projection head when the source
has one of the same shapes (a moco_tf model_dir of the same dim/mlp); the optimizer and the
queue start fresh. Only step 0 reads PATH: a resumed run takes everything from its checkpoint.
Reading PATH is `moco_tf.weights.init_from`'s (whatever `moco_tf.weights.pretrained` accepts);
this module checks and copies.

Extension: a finished (or running) model_dir trained again with a larger --epochs and
--allow_more_epochs; the schedule is recomputed over the new total, and config.json records
each extension (old and new epochs, the step it happened at).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import keras
import numpy as np

from moco_tf.models.backbones import BackboneSpec
from moco_tf.models.moco import MoCo
from moco_tf.training.config import PretrainConfig
from moco_tf.weights.init_from import InitFromError, InitialWeights, load_initial_weights

log = logging.getLogger(__name__)


def check_backbone(init: InitialWeights, spec: BackboneSpec, path: str) -> None:
    """The source's backbone must be this run's: the same arch, width and stem."""
    if init.spec != spec:
        theirs = f"{init.spec.label} (cifar_stem={init.spec.cifar_stem})"
        ours = f"{spec.label} (cifar_stem={spec.cifar_stem})"
        raise InitFromError(
            f"--init_from={path} holds a {theirs} backbone, this run trains a {ours}: give the same --arch, "
            "--width and --cifar_stem as the source"
        )


def apply(model: MoCo, init: InitialWeights) -> list[str]:
    """Copies the source's weights into both encoders; returns the parts copied ("backbone", "head")."""
    copied = []
    for encoder in (model.encoder_q, model.encoder_k):
        _assign(encoder.backbone, init.backbone)
    copied.append("backbone")
    if init.head is not None and _shapes(model.encoder_q.head.weights) == [w.shape for w in init.head]:
        for encoder in (model.encoder_q, model.encoder_k):
            _assign(encoder.head, init.head)
        copied.append("head")
    return copied


def _shapes(weights: list[Any]) -> list[tuple[int, ...]]:
    return [tuple(w.shape) for w in weights]


def _assign(layer: keras.Model, values: list[np.ndarray]) -> None:
    # assign() keeps each variable's trainable flag (the key encoder's stay frozen).
    if _shapes(layer.weights) != [tuple(v.shape) for v in values]:
        raise InitFromError(f"the source's weights do not fit {layer.name} (shapes differ)")
    for weight, value in zip(layer.weights, values, strict=True):
        weight.assign(value)


# ----------------------------------------------------------------------------------------------
# extension


def extension(saved: PretrainConfig, current: PretrainConfig) -> tuple[int, int] | None:
    """(old epochs, new epochs) when `current` extends `saved` (more epochs, --allow_more_epochs),
    else None. Fewer epochs than the run's are never an extension (the recipe check refuses them)."""
    if not current.runtime.allow_more_epochs or current.optim.epochs <= saved.optim.epochs:
        return None
    return saved.optim.epochs, current.optim.epochs


def extended_config(saved: PretrainConfig, current: PretrainConfig, step: int) -> PretrainConfig:
    """The config to record after extending `saved` to `current`'s epochs at `step`: the run's own
    recipe with the new epochs, its earlier extensions plus this one, and the current operational
    settings (what config.json would record for a fresh start of this command)."""
    record = {"from_epochs": saved.optim.epochs, "to_epochs": current.optim.epochs, "at_step": int(step)}
    return dataclasses.replace(
        current,
        runtime=dataclasses.replace(current.runtime, init_from=saved.runtime.init_from),
        source=saved.source if saved.source is not None else current.source,
        extensions=(*saved.extensions, record),
        unrecorded=saved.unrecorded,
    )


def comparable(saved: PretrainConfig, current: PretrainConfig) -> PretrainConfig:
    """`saved` as the resume check should see it: with --allow_more_epochs and a larger --epochs,
    the run's epochs are taken as the current ones (every other recipe setting is still compared)."""
    if extension(saved, current) is None:
        return saved
    return dataclasses.replace(saved, optim=dataclasses.replace(saved.optim, epochs=current.optim.epochs))


def initialise(model: MoCo, config: PretrainConfig) -> PretrainConfig:
    """At step 0 of a run with --init_from: copies PATH's weights into `model` and returns the config
    to record (init_from made absolute, `source` saying what the weights came from)."""
    path = _absolute(config.runtime.init_from)  # recorded so: a resume may run from another folder
    init = load_initial_weights(path)
    check_backbone(init, config.model.backbone, path)
    copied = apply(model, init)
    log.info(f"initialised the query and key encoders' {' and '.join(copied)} from {init.description}")
    runtime = dataclasses.replace(config.runtime, init_from=path)
    return dataclasses.replace(config, runtime=runtime, source=f"initialised from {init.description}")


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)
