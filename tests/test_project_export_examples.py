"""export/segmentation_example.py: an FPN-style head on the export's feature maps trains in Keras 3,
the encoder frozen (its weights untouched) or fine-tuned (every weight and BN statistic moves)."""

from __future__ import annotations

import importlib.util
import os

import keras
import pytest

from moco_tf.interop import hub
from moco_tf.models.backbones import BackboneSpec
from tests.support.helpers import ROOT, randomize


def _example():
    spec = importlib.util.spec_from_file_location(
        "segmentation_example", os.path.join(ROOT, "export", "segmentation_example.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    keras.utils.set_random_seed(0)
    spec = BackboneSpec("resnet18", 8, True)
    backbone = spec.build()
    randomize(backbone)
    return hub.export_backbone(backbone, str(tmp_path_factory.mktemp("seg") / "r18"), spec.to_dict())


# The fine-tuned head (through the training endpoints, which tests/test_interop_hub.py checks in
# a fresh process) runs with -m slow; the frozen one in CI.
@pytest.mark.parametrize("fine_tune", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_segmentation_head_trains_on_the_feature_maps(export_dir, fine_tune):
    result = _example().train(export_dir, steps=4, image_size=32, fine_tune=fine_tune, batch=8)
    assert result["output_shape"] == (None, 32, 32, 4)  # per-pixel logits at the input's size
    # 4 laterals + smooth + classifier (kernel, bias each); + the encoder's 60 when fine-tuned.
    assert result["trainable_weights"] == 12 + (60 if fine_tune else 0)
    assert result["encoder_weights"] == 100  # 60 trainable + 40 BN moving statistics
    assert result["encoder_weights_changed"] == (100 if fine_tune else 0)
    assert result["train_loss_last_step"] < result["train_loss_first_step"], result
    if not fine_tune:  # frozen encoder: the held-out loss (BN in inference mode) falls too
        assert result["loss_after"] < result["loss_before"], result
