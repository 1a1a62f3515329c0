"""load_backbone: every kind of PATH gives the same features as the network it came from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moco_tf.interop import hub
from moco_tf.interop.pretrained import FrozenBackbone, PretrainedError, load_backbone
from moco_tf.models.moco import projection_head
from moco_tf.models.resnet import resnet
from tests import torch_reference
from tests.helpers import randomize

MEAN = np.array(hub.IMAGENET_MEAN, np.float32)
STD = np.array(hub.IMAGENET_STD, np.float32)


def images(n=3, size=32, seed=1):
    return ((np.random.RandomState(seed).rand(n, size, size, 3).astype(np.float32)) - MEAN) / STD


def test_export_is_rebuilt_exactly(tmp_path):
    backbone = resnet("resnet18", cifar_stem=True)
    randomize(backbone)  # BN statistics that differ from training mode's
    head = projection_head(512, 16, mlp=True)
    config = {"arch": "resnet18", "cifar_stem": True, "image_size": 32, "dataset": "digits"}
    path = hub.export_backbone(backbone, str(tmp_path / "r18"), config, head=head)
    loaded, info = load_backbone(path)
    assert isinstance(loaded, FrozenBackbone)
    assert info["kind"] == "export" and info["arch"] == "resnet18" and info["cifar_stem"]
    assert info["image_size"] == 32 and info["feature_dim"] == 512
    for ours, theirs in zip(loaded.model.weights, backbone.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs), err_msg=theirs.path)
    x = images()  # graph vs eager execution: equal up to float rounding
    np.testing.assert_allclose(loaded(x).numpy(), backbone(x, training=False).numpy(), rtol=1e-5, atol=1e-5)


def test_export_with_wrong_config_is_refused(tmp_path):
    backbone = resnet("resnet18", cifar_stem=True)
    path = hub.export_backbone(backbone, str(tmp_path / "r18"), {"arch": "resnet34", "cifar_stem": True})
    with pytest.raises(PretrainedError, match="do not fit a resnet34"):
        load_backbone(path)


@pytest.mark.parametrize("width", [64, 8])
def test_torch_checkpoint_matches_torch(tmp_path, width):
    torch.manual_seed(0)
    head = torch_reference.moco_head(8 * width, 16, mlp=True)
    net = torch_reference.ResNet(18, fc=head, cifar_stem=True, width=width).eval()
    with torch.no_grad():  # non-trivial BN statistics, so inference mode is what is compared
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    state = {f"module.encoder_q.{k}": v for k, v in net.state_dict().items()}
    path = str(tmp_path / "checkpoint_0009.pth.tar")
    torch.save({"epoch": 10, "arch": "resnet18", "state_dict": state}, path)
    loaded, info = load_backbone(path)
    assert info["kind"] == "torch" and info["arch"] == "resnet18" and info["cifar_stem"]
    assert info["image_size"] == 32 and info["width"] == width and info["feature_dim"] == 8 * width
    x = images()
    net.fc = torch.nn.Identity()
    with torch.no_grad():
        expected = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(loaded(x).numpy(), expected, rtol=1e-4, atol=1e-4)


def test_inference_mode_and_frozen():
    backbone = resnet("resnet18", cifar_stem=True)
    randomize(backbone)
    x = images()
    in_training = backbone(x, training=True).numpy()  # (moves the BN statistics)
    frozen = FrozenBackbone(backbone)
    before = frozen.snapshot()
    np.testing.assert_allclose(frozen(x).numpy(), backbone(x, training=False).numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(frozen(x).numpy(), in_training, atol=1e-3)
    frozen(x)
    after = frozen.snapshot()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert backbone.trainable_weights == []


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: str(d / "nothing_here"), "does not exist"),
        (lambda d: _write(d / "notes.txt", b"hello"), "is not a checkpoint"),
        (lambda d: _saved_model(d), "not a moco_tf export"),
        (lambda d: str(d), "is not a moco_tf model_dir"),
    ],
)
def test_unusable_paths_are_one_clear_error(tmp_path, make, message):
    with pytest.raises(PretrainedError, match=message) as error:
        load_backbone(make(tmp_path))
    assert "\n" not in str(error.value)


def _write(path, content):
    path.write_bytes(content)
    return str(path)


def _saved_model(directory):
    import tensorflow as tf

    module = tf.Module()
    module.v = tf.Variable(1.0)
    path = str(directory / "plain_saved_model")
    tf.saved_model.save(module, path)
    return path


def test_model_dir_and_checkpoint(tmp_path):
    import glob

    from moco_tf.models.moco import MoCo
    from moco_tf.training.checkpoint import write_model_dir

    model = MoCo(arch="resnet18", cifar_stem=True, dim=16, queue_size=32, bn_groups=2, image_size=32)
    randomize(model.backbone_q)
    path = write_model_dir(str(tmp_path / "run"), model, {"dataset": "digits", "image_size": 32})
    x = images()
    expected = model.backbone_q(x, training=False).numpy()
    for where, kind in ((path, "model_dir"), (glob.glob(f"{path}/*/ckpt-0.index")[0][: -len(".index")], "checkpoint")):
        loaded, info = load_backbone(where)
        assert info["kind"] == kind and info["arch"] == "resnet18" and info["cifar_stem"] and info["image_size"] == 32
        np.testing.assert_allclose(loaded(x).numpy(), expected, rtol=1e-5, atol=1e-5)
        # Rebuilt without the training-time input size and BN groups: any size evaluates.
        assert loaded(images(size=40)).shape == (3, 512)
