"""Reading --init_from PATH for training (`moco_tf.training.warm_start` checks and copies).

PATH is anything `moco_tf.interop.pretrained` loads: a moco_tf model_dir or checkpoint, a
moco_tf TF-Hub export, an official PyTorch checkpoint. A model_dir also gives its projection head.
"""

from __future__ import annotations

from moco_tf.errors import UserError
from moco_tf.interop import pretrained
from moco_tf.models.backbones import BackboneSpec
from moco_tf.training.checkpoint import restore_model
from moco_tf.training.warm_start import InitFromError, InitialWeights


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
