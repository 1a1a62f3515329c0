"""load_backbone: every kind of PATH gives the same features as the network it came from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moco_tf.interop import hub
from moco_tf.models.moco import projection_head
from moco_tf.models.resnet import resnet
from moco_tf.weights.pretrained import FrozenBackbone, PretrainedError, load_backbone
from tests.support import torch_reference
from tests.support.helpers import randomize, weights_snapshot

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
    before = weights_snapshot(frozen)
    np.testing.assert_allclose(frozen(x).numpy(), backbone(x, training=False).numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(frozen(x).numpy(), in_training, atol=1e-3)
    frozen(x)
    after = weights_snapshot(frozen)
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


# ----------------------------------------------------------------------------------------------
# exports are read as data: the graph is never loaded, so it never runs


@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
    """A width-8 ResNet-18 export with random BN statistics and a v2 head: (path, backbone)."""
    backbone = resnet("resnet18", cifar_stem=True, width=8)
    randomize(backbone, seed=3)
    config = {"arch": "resnet18", "width": 8, "cifar_stem": True, "image_size": 32, "mlp": True, "dim": 16}
    path = hub.export_backbone(backbone, str(tmp_path_factory.mktemp("exports") / "r18w8"), config,
                               head=projection_head(64, 16, mlp=True))
    return path, backbone


def test_export_read_as_data_gives_the_exports_features(small_export, monkeypatch):
    import tensorflow as tf

    path, backbone = small_export
    with monkeypatch.context() as patched:  # the loader must not load the SavedModel (it would run its graph)
        patched.setattr(tf.saved_model, "load", _must_not_run)
        loaded, info = load_backbone(path)
    assert info["kind"] == "export" and info["width"] == 8 and info["feature_dim"] == 64
    for ours, theirs in zip(loaded.model.weights, backbone.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs), err_msg=theirs.path)
    # The reference: the export's own graph, loaded here in the test only.
    x = np.random.RandomState(5).rand(4, 32, 32, 3).astype(np.float32)
    theirs = tf.saved_model.load(path)(tf.constant(x), training=False).numpy()
    ours = loaded((tf.constant(x) - MEAN) / STD).numpy()
    difference = float(np.abs(ours - theirs).max())
    print(f"rebuilt backbone vs the export's graph: max abs difference {difference:.3g} (features up to "
          f"{np.abs(theirs).max():.3g})")
    assert difference <= 1e-6


def _must_not_run(*args, **kwargs):
    raise AssertionError("tf.saved_model.load called while loading an export")


def _hostile_saved_model(directory, marker):
    """A SavedModel whose __call__ writes `marker` (what loading it would run, as hub.KerasLayer does)."""
    import tensorflow as tf

    class Hostile(tf.Module):
        def __init__(self):
            super().__init__()
            self.v = tf.Variable(1.0)

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
        def __call__(self, images):
            tf.io.write_file(marker, "ran")
            return tf.reduce_mean(images, axis=[1, 2]) * self.v

    path = str(directory)
    tf.saved_model.save(Hostile(), path)
    return path


def test_a_saved_model_that_writes_a_file_is_never_run(small_export, tmp_path):
    import shutil

    from moco_tf.weights.init_from import InitFromError, load_initial_weights

    export, _ = small_export
    marker = str(tmp_path / "written_by_the_model")
    hostile = _hostile_saved_model(tmp_path / "hostile", marker)
    shutil.copytree(f"{export}/assets", f"{hostile}/assets", dirs_exist_ok=True)  # a copied moco_config.json
    with pytest.raises(PretrainedError, match="its variables do not fit a resnet18 .*: it has no variables/0") as error:
        load_backbone(hostile)
    assert "\n" not in str(error.value)
    with pytest.raises(InitFromError, match="do not fit"):
        load_initial_weights(hostile)  # train --init_from's reader
    # With the export's own variables the network loads (they are data) and the graph still never runs.
    shutil.rmtree(f"{hostile}/variables")
    shutil.copytree(f"{export}/variables", f"{hostile}/variables")
    loaded, info = load_backbone(hostile)
    assert info["kind"] == "export" and loaded(images()).shape == (3, 64)
    assert not (tmp_path / "written_by_the_model").exists()


def _export_copy(export, tmp_path, config_changes=None, variables_from=None):
    import json
    import shutil

    path = str(tmp_path / "copy")
    shutil.copytree(export, path)
    if config_changes is not None:
        with open(f"{path}/assets/moco_config.json") as f:
            config = json.load(f)
        config.update(config_changes)
        with open(f"{path}/assets/moco_config.json", "w") as f:
            json.dump(config, f)
    if variables_from is not None:
        shutil.rmtree(f"{path}/variables")
        shutil.copytree(f"{variables_from}/variables", f"{path}/variables")
    return path


def _export_of(tmp_path, name, backbone, **kwargs):
    return hub.export_backbone(backbone, str(tmp_path / name), {"arch": "resnet18", "cifar_stem": True}, **kwargs)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"width": 10**6}, r"width must be at most 1024 channels"),
        ({"width": 16}, r"its first variable has shape \[3, 3, 3, 8\], a resnet18 width 16 stem has 16 channels"),
        ({"image_size": 10**5}, r"records image_size=100000: must be in \[16, 4096\]"),
        ({"projection_dim": 2**40}, r"--projection_dim must be at most 2\*\*31 - 1, got 1099511627776"),
        ({"num_classes": 10}, r"104 variables where it has 106 \(variables/104 is missing"),
        ({"projection_dim": None}, r"104 variables where it has 100 \(variables/100 is extra"),
        ({"arch": "resnet34"}, r"do not fit a resnet34"),
        ({"mlp": "yes"}, r"records mlp='yes': must be true or false"),
    ],
)
def test_an_export_whose_config_or_variables_do_not_fit_is_refused_in_one_line(
    small_export, tmp_path, change, message
):
    path = _export_copy(small_export[0], tmp_path, config_changes=change)
    with pytest.raises(PretrainedError, match=message) as error:
        load_backbone(path)
    assert "\n" not in str(error.value) and path in str(error.value)


def test_an_export_with_damaged_files_is_refused_in_one_line(small_export, tmp_path):
    import glob

    export = small_export[0]
    garbled = _export_copy(export, tmp_path / "a")
    with open(f"{garbled}/assets/moco_config.json", "w") as f:
        f.write('{"arch": "resnet18", ')
    truncated = _export_copy(export, tmp_path / "b")
    data = glob.glob(f"{truncated}/variables/variables.data-*")[0]
    with open(data, "r+b") as f:
        f.truncate(1000)
    noise = _export_copy(export, tmp_path / "c")
    with open(f"{noise}/variables/variables.index", "wb") as f:
        f.write(np.random.RandomState(0).bytes(300))
    for path, message in ((garbled, "moco_config.json is not readable JSON"),
                          (truncated, "its data files hold 1000"),
                          (noise, "its variables are unreadable")):
        with pytest.raises(PretrainedError, match=message) as error:
            load_backbone(path)
        assert "\n" not in str(error.value)
