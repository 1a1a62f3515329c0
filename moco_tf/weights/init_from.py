"""Reading --init_from PATH for a new pretraining run (`moco_tf.training.warm_start` checks the
weights and copies them into the model).

PATH is anything `moco_tf.weights.pretrained` loads: a moco_tf model_dir or checkpoint, a moco_tf
TF-Hub export, an official PyTorch checkpoint. A model_dir also gives its projection head.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from moco_tf.errors import UserError
from moco_tf.models.backbones import BackboneSpec
from moco_tf.training.checkpoint import restore_model
from moco_tf.weights import pretrained


class InitFromError(UserError):
    """--init_from names weights this run cannot start from; one line saying why."""


@dataclasses.dataclass
class InitialWeights:
    """What a run can start from: a backbone's weights (in `spec.build()` order), the spec they fit,
    the projection head's weights when the source has one, and where they came from (for messages
    and config.json's `source`)."""

    backbone: list[np.ndarray]
    spec: BackboneSpec
    description: str
    head: list[np.ndarray] | None = None


def load_initial_weights(path: str) -> InitialWeights:
    """The backbone (and, from a moco_tf model_dir or checkpoint, the head) weights at PATH."""
    try:
        backbone, info = pretrained.load_backbone(path)
    except UserError as error:  # its messages name --pretrained, the evaluation command lines' flag
        raise InitFromError(str(error).replace("--pretrained", "--init_from")) from None
    head = None
    if info["kind"] in ("model_dir", "checkpoint"):
        # Read a second time for the head: load_backbone returns the backbone alone.
        model, _ = restore_model(path)
        head = [w.numpy() for w in model.encoder_q.head.weights]
    return InitialWeights(
        backbone=[w.numpy() for w in backbone.model.weights],
        spec=BackboneSpec.from_dict(info),
        description=info["description"],
        head=head,
    )
