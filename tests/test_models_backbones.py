"""The backbone spec and its registry: lookup, facts (feature dim, default size), building, and the
dict form config.json and moco_config.json store (older files without width or cifar_stem)."""

import subprocess

import keras
import numpy as np
import pytest

from moco_tf.models import backbones
from moco_tf.models.backbones import BackboneSpec


def test_registry_holds_the_resnets_and_names_them_when_asked_for_another():
    assert backbones.backbone_names() == ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
    assert backbones.get_backbone("resnet50").name == "resnet50"
    with pytest.raises(ValueError) as error:
        backbones.get_backbone("vgg16")
    assert str(error.value) == "unknown arch 'vgg16'; choose one of resnet18, resnet34, resnet50, resnet101, resnet152"
    with pytest.raises(ValueError, match="unknown arch 'resnet20'"):
        BackboneSpec("resnet20")


@pytest.mark.parametrize(
    "arch, width, dim",
    [("resnet18", 64, 512), ("resnet34", 64, 512), ("resnet50", 64, 2048), ("resnet152", 64, 2048),
     ("resnet18", 16, 128), ("resnet101", 8, 256)],
)
def test_feature_dim_is_8_width_for_basic_blocks_and_32_width_for_bottlenecks(arch, width, dim):
    assert BackboneSpec(arch, width).feature_dim == dim


def test_default_image_size_follows_the_stem():
    assert BackboneSpec("resnet18", cifar_stem=True).default_image_size == 32
    assert BackboneSpec("resnet50").default_image_size == 224
    assert backbones.default_image_size(True) == 32 and backbones.default_image_size(False) == 224
    assert backbones.official_dataset(True) == "cifar10" and backbones.official_dataset(False) == "imagenet2012"


def test_preprocessing_constants_are_imagenet_statistics():
    spec = BackboneSpec()
    assert spec.mean == backbones.IMAGENET_MEAN == (0.485, 0.456, 0.406)
    assert spec.std == backbones.IMAGENET_STD == (0.229, 0.224, 0.225)


def test_build_gives_features_of_feature_dim():
    spec = BackboneSpec("resnet18", width=8, cifar_stem=True)
    model = spec.build(image_size=spec.default_image_size, bn_groups=2)
    assert model.input_shape == (None, 32, 32, 3)
    assert model.get_layer("conv1").kernel.shape == (3, 3, 3, 8)  # the CIFAR stem's 3x3 conv
    assert model.get_layer("bn1").num_groups == 2
    features = model(np.zeros((2, 32, 32, 3), np.float32), training=False)
    assert features.shape == (2, spec.feature_dim) == (2, 64)

    spec = BackboneSpec("resnet50", width=8)
    model = spec.build(name="backbone")
    assert model.name == "backbone" and model.input_shape == (None, None, None, 3)
    assert model.get_layer("conv1").kernel.shape == (7, 7, 3, 8)
    assert model(np.zeros((1, 64, 64, 3), np.float32)).shape == (1, spec.feature_dim) == (1, 256)


def test_dict_round_trip_and_older_files():
    spec = BackboneSpec("resnet18", width=16, cifar_stem=True)
    assert spec.to_dict() == {"arch": "resnet18", "width": 16, "cifar_stem": True}
    assert BackboneSpec.from_dict(spec.to_dict()) == spec
    # A whole config (other keys ignored); files before --width / the CIFAR stem lack those keys.
    assert BackboneSpec.from_dict({"arch": "resnet50", "dim": 128, "feature_dim": 2048}) == BackboneSpec("resnet50")
    assert BackboneSpec.from_dict({"arch": "resnet18", "width": None, "cifar_stem": True}).width == 64
    with pytest.raises(ValueError, match="no arch"):
        BackboneSpec.from_dict({"width": 8})


@pytest.mark.parametrize(
    "kwargs, message",
    [({"width": 0}, "width must be a positive number of channels, got 0"),
     ({"width": True}, "width must be a positive number of channels, got True"),
     ({"width": 8.0}, "width must be a positive number of channels, got 8.0"),
     ({"cifar_stem": "yes"}, "cifar_stem must be true or false, got 'yes'")],
)
def test_invalid_specs_are_refused(kwargs, message):
    with pytest.raises(ValueError) as error:
        BackboneSpec("resnet18", **kwargs)
    assert str(error.value) == message


def test_label_and_tag_show_a_nonstandard_width():
    assert BackboneSpec("resnet50").label == BackboneSpec("resnet50").tag == "resnet50"
    assert BackboneSpec("resnet18", 8).label == "resnet18 width 8"
    assert BackboneSpec("resnet18", 8).tag == "resnet18w8"


def test_a_new_backbone_is_one_entry():
    import keras

    def tiny(cifar_stem, bn_groups, image_size, width, name):
        inputs = keras.Input((image_size, image_size, 3))
        x = keras.layers.Conv2D(width, 3, name="conv1")(inputs)
        return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x), name=name or "tiny")

    backbones.register_backbone("tiny", tiny, feature_dim=lambda width: width)
    try:
        spec = BackboneSpec.from_dict({"arch": "tiny", "width": 5})
        assert spec.feature_dim == 5 and "tiny" in backbones.backbone_names()
        assert spec.build()(np.zeros((1, 8, 8, 3), np.float32)).shape == (1, 5)
        # ... and MoCo trains on it with no other change: both encoders built from the spec.
        from moco_tf.models.moco import MoCo

        model = MoCo(backbone=spec, dim=4, queue_size=8, image_size=8)
        assert model.backbone_spec == spec and model.get_config()["arch"] == "tiny"
        assert model(np.zeros((2, 8, 8, 3), np.float32)).shape == (2, 4)
        assert model.encoder_k.backbone.get_layer("conv1").kernel.shape == (3, 3, 3, 5)
        with pytest.raises(ValueError, match="either backbone or arch"):
            MoCo("resnet18", backbone=spec)
        with pytest.raises(ValueError, match="'tiny' is already registered"):
            backbones.register_backbone("tiny", tiny, feature_dim=lambda width: width)
    finally:
        del backbones.BACKBONES["tiny"]


# One training step of a width-8 resnet18 on an odd batch, with oneDNN on (TF's CPU default; the
# tests otherwise turn it off): before SubsampledConv2D this died in the gradient of the 1x1
# stride-2 shortcut ("double free or corruption", exit 134, or a segfault, 139), which killed
# `moco_tf.finetune` at 5% of digits (73 images: a last batch of 9).
_ODD_BATCH_STEP = """
import tensorflow as tf
from moco_tf.models.backbones import BackboneSpec
model = BackboneSpec("resnet18", 8, True).build()
for batch in (9, 1):
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(tf.random.normal([batch, 32, 32, 3]), training=True) ** 2)
    grads = tape.gradient(loss, model.trainable_variables)
    assert all(g is not None for g in grads)
print("ok")
"""


def test_a_training_step_on_an_odd_batch_survives_onednn():
    from tests.support.helpers import ENV, PYTHON, ROOT

    env = {**ENV, "TF_ENABLE_ONEDNN_OPTS": "1"}
    result = subprocess.run(
        [PYTHON, "-c", _ODD_BATCH_STEP], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize("size", [8, 7])
def test_the_subsampled_shortcut_conv_equals_a_strided_conv(size):
    from moco_tf.models.resnet import SubsampledConv2D

    x = np.random.default_rng(0).normal(size=(3, size, size, 4)).astype("float32")
    strided = keras.layers.Conv2D(6, 1, strides=2, padding="same", use_bias=False)
    subsampled = SubsampledConv2D(6, 1, strides=2, padding="same", use_bias=False)
    strided.build(x.shape)
    subsampled.build(x.shape)
    subsampled.set_weights(strided.get_weights())
    np.testing.assert_array_equal(np.asarray(subsampled(x)), np.asarray(strided(x)))
    assert subsampled.compute_output_shape(x.shape) == strided.compute_output_shape(x.shape)
    assert subsampled.get_config() == strided.get_config() | {"name": subsampled.name}
    with pytest.raises(ValueError, match="1x1"):
        SubsampledConv2D(6, 3, strides=2)
