"""TF-Hub export: layout, atomic writing, and every consumer, each in a fresh process.

A ResNet-18 with random BatchNorm statistics on small images keeps this fast; the numerics
of full-size ResNet-18/50 against PyTorch are in test_interop_torch.py.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess

import numpy as np
import pytest
import tensorflow as tf

from moco_tf import atomic_write
from moco_tf.interop import hub
from moco_tf.models.moco import MoCo, projection_head
from moco_tf.models.resnet import resnet
from tests.support.helpers import PYTHON, ROOT, randomize, run, tiny_backbone, tree

MEAN = np.array(hub.IMAGENET_MEAN, np.float32)
STD = np.array(hub.IMAGENET_STD, np.float32)
CONFIG = {"arch": "resnet18", "moco_version": "v2", "epochs": 3, "dataset": "digits"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(export path, npz with images in [0, 1] and the Keras backbone's features / projections)."""
    import keras

    # A module fixture is set up before the per-test seed (conftest): seed it, or its random
    # weights change from session to session (graph vs eager differences up to ~1e-5 came with some).
    keras.utils.set_random_seed(0)
    backbone = resnet("resnet18")
    randomize(backbone)
    head = projection_head(512, 16, mlp=True)
    root = tmp_path_factory.mktemp("hub")
    path = hub.export_backbone(backbone, str(root / "exports" / "r18"), CONFIG, head=head)
    x = np.random.RandomState(1).rand(4, 40, 56, 3).astype(np.float32)
    features = backbone((x - MEAN) / STD, training=False).numpy()
    data = root / "data.npz"
    np.savez(data, x=x, features=features, projection=head(features).numpy())
    return path, str(data)


def test_layout_and_config(exported):
    path, _ = exported
    assert sorted(os.listdir(path)) == ["assets", "fingerprint.pb", "saved_model.pb", "variables"]
    assert os.listdir(os.path.dirname(path)) == ["r18"], "staging folders left behind"
    config = hub.read_config(path)
    assert {k: config[k] for k in CONFIG} == CONFIG
    assert config["feature_dim"] == 512 and config["projection_dim"] == 16
    assert config["preprocessing"]["mean"] == list(hub.IMAGENET_MEAN)


def test_refuses_to_overwrite_then_replaces(tmp_path):
    backbone = tiny_backbone()
    target = str(tmp_path / "e")
    hub.export_backbone(backbone, target, {"arch": "resnet18", "tag": 1})
    with pytest.raises(FileExistsError, match="overwrite"):
        hub.export_backbone(backbone, target, {"arch": "resnet18", "tag": 2})
    assert hub.read_config(target)["tag"] == 1
    with pytest.raises(FileExistsError, match="pass --overwrite_export to replace it"):  # train's flag
        hub.check_export_target(target, overwrite_flag="--overwrite_export")
    hub.export_backbone(backbone, target, {"arch": "resnet18", "tag": 2}, overwrite=True)
    assert hub.read_config(target)["tag"] == 2
    assert os.listdir(tmp_path) == ["e"]


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tf.saved_model, "save", fail)
    with pytest.raises(KeyboardInterrupt):
        hub.export_backbone(tiny_backbone(), str(tmp_path / "e"), {"arch": "resnet18"})
    assert os.listdir(tmp_path) == []


# Each consumer runs in its own fresh process: argv = export path, data.npz; prints "OK".
CONSUMERS = {
    "hub_frozen": r"""
import numpy as np, tensorflow_hub as hub, tf_keras
layer = hub.KerasLayer(path)
model = tf_keras.Sequential([tf_keras.Input((None, None, 3)), layer, tf_keras.layers.Dense(10)])
assert not layer.trainable_weights and len(model.trainable_weights) == 2
features = tf_keras.Model(model.inputs, model.layers[0].output).predict(data["x"], verbose=0)
assert np.abs(features - data["features"]).max() < 1e-5, np.abs(features - data["features"]).max()
""",
    "hub_trainable": r"""
import numpy as np, tensorflow as tf, tensorflow_hub as hub, tf_keras
layer = hub.KerasLayer(path, trainable=True)
model = tf_keras.Sequential([tf_keras.Input((None, None, 3)), layer, tf_keras.layers.Dense(3)])
assert len(layer.trainable_weights) == 60 and len(layer.non_trainable_weights) == 44
x = data["x"]
assert np.abs(layer(x, training=False).numpy() - data["features"]).max() < 1e-5
# BN in training mode: batch statistics, so the features differ from inference mode.
assert np.abs(layer(x, training=True).numpy() - data["features"]).max() > 1e-2
before = {w.name: w.numpy().copy() for w in layer.weights}
model.compile(tf_keras.optimizers.SGD(0.1), tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
model.fit(x, np.array([0, 1, 2, 0]), batch_size=4, epochs=1, verbose=0)
changed = {w.name for w in layer.weights if not np.array_equal(before[w.name], w.numpy())}
trainable = {w.name for w in layer.trainable_weights}
assert trainable <= changed, sorted(trainable - changed)  # every encoder weight was fine-tuned
moving = {w.name for w in layer.non_trainable_weights if "moving" in w.name and "fc." not in w.name}
assert moving and moving <= changed, sorted(moving - changed)  # BN updated its statistics
""",
    "tfsm_layer": r"""
import numpy as np, keras
layer = keras.layers.TFSMLayer(path, call_endpoint="serving_default")
inputs = keras.Input((None, None, 3))
model = keras.Model(inputs, layer(inputs))
out = model.predict(data["x"], verbose=0)
assert np.abs(out["feature_vector"] - data["features"]).max() < 1e-5
assert np.abs(out["projection"] - data["projection"]).max() < 1e-5
# TFSMLayer trains the encoder unless told not to (export/README.md says so).
assert len(layer.trainable_weights) == 60 + 4  # the backbone's and the projection head's
frozen = keras.layers.TFSMLayer(path, call_endpoint="serving_default", trainable=False)
assert not frozen.trainable_weights and len(frozen.weights) == len(layer.weights)
""",
    "tfsm_finetune": r"""
import numpy as np, keras
# Keras 3 fine-tuning: one endpoint per BatchNorm mode (TFSMLayer cannot pass `training` itself).
layer = keras.layers.TFSMLayer(path, call_endpoint="features", call_training_endpoint="features_training")
assert len(layer.trainable_weights) == 60 and len(layer.non_trainable_weights) == 40  # no head: unused
inputs = keras.Input((None, None, 3))
model = keras.Model(inputs, keras.layers.Dense(3)(layer(inputs)))
x = data["x"]
assert np.abs(layer(x).numpy() - data["features"]).max() < 1e-5  # inference mode by default
before = {id(w): np.array(w) for w in layer.weights}
moving = [w for w in layer.non_trainable_weights if "moving" in w.name]
assert len(moving) == 40
model.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
model.fit(x, np.array([0, 1, 2, 0]), batch_size=4, epochs=2, verbose=0)
unchanged = [w.name for w in layer.weights if np.array_equal(before[id(w)], np.array(w))]
assert unchanged == [], unchanged  # every encoder weight and every BN moving statistic moved
# Inference after fit: the moving statistics, so an image's output does not depend on its batch
# (batch statistics would), and it is the export's own inference function on the new weights.
features = model.layers[1](x, training=False).numpy()
alone = model.layers[1](x[:1], training=False).numpy()
scale = np.abs(features).max()  # float32 convolutions differ by batch size at ~1e-6 of the scale
assert np.abs(features[:1] - alone).max() < 1e-4 * scale, (np.abs(features[:1] - alone).max(), scale)
assert np.abs(features - data["features"]).max() > 1e-3  # the weights did change
predicted = model.predict(x, verbose=0)
np.testing.assert_allclose(predicted, model.layers[2](features).numpy(), rtol=1e-4, atol=1e-5)
training = layer(x, training=True).numpy()  # batch statistics: not the moving ones
assert np.abs(training - features).max() > 1e-2
""",
    "saved_model_load": r"""
import json, numpy as np, tensorflow as tf
loaded = tf.saved_model.load(path)
x = tf.constant(data["x"])
assert np.abs(loaded(x).numpy() - data["features"]).max() < 1e-5
assert np.abs(loaded(x, training=False).numpy() - data["features"]).max() < 1e-5
out = loaded.signatures["serving_default"](images=x)
assert np.abs(out["feature_vector"].numpy() - data["features"]).max() < 1e-5
assert len(loaded.trainable_variables) == 60 and loaded.regularization_losses == []
maps = loaded.signatures["feature_maps"](images=x)
assert [tuple(maps[f"layer{s}"].shape) for s in (1, 4)] == [(4, 10, 14, 64), (4, 2, 2, 512)]
pooled = maps["layer4"].numpy().mean(axis=(1, 2))
assert np.abs(pooled - data["features"]).max() < 1e-5
config = json.load(open(loaded.config_file.asset_path.numpy().decode()))
assert config["arch"] == "resnet18"
""",
}


@pytest.mark.parametrize("consumer", sorted(CONSUMERS))
def test_consumer_in_fresh_process(exported, consumer, tmp_path):
    path, data = exported
    script = tmp_path / f"{consumer}.py"
    header = "import sys\nimport numpy as np\npath, data = sys.argv[1], np.load(sys.argv[2])\n"
    script.write_text(header + CONSUMERS[consumer] + "print('OK')\n")
    result = run(str(script), path, data)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-3000:]


def test_saved_model_cli_show(exported):
    path, _ = exported
    cli = os.path.join(os.path.dirname(PYTHON), "saved_model_cli")
    result = subprocess.run(
        [cli, "show", "--dir", path, "--all"], capture_output=True, text=True, timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "signature_def['serving_default']" in out and "signature_def['feature_maps']" in out
    assert "outputs['feature_vector']" in out and "(-1, 512)" in out
    assert "(-1, -1, -1, 3)" in out


def test_example_script(exported):
    path, _ = exported
    result = run(os.path.join(ROOT, "export", "example.py"), f"--export_dir={path}", "--fine_tune")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "feature_vector (2, 512)" in result.stdout and "keras 3 logits (2, 10)" in result.stdout, result.stdout


def test_cli_refuses_to_overwrite_in_one_line(exported, tmp_path):
    path, _ = exported
    result = run("-m", "moco_tf.export", f"--model_dir={tmp_path}", f"--export_dir={path}")
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "already exists" in last and "--overwrite" in last, result.stderr


def test_missing_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hub.export_model_dir(str(tmp_path / "absent"), str(tmp_path / "e"))


def test_export_moco_frees_image_size_and_bn_groups(tmp_path):
    model = MoCo(
        arch="resnet18", dim=16, queue_size=8, mlp=True, bn_groups=2, cifar_stem=True, image_size=32
    )
    randomize(model.backbone_q)
    path = hub.export_moco(model, str(tmp_path / "e"), {"epochs": 1})
    config = hub.read_config(path)
    assert config["arch"] == "resnet18" and config["cifar_stem"] and config["epochs"] == 1
    loaded = tf.saved_model.load(path)
    x = np.random.RandomState(2).rand(3, 32, 32, 3).astype(np.float32)
    expected = model.backbone_q((x - MEAN) / STD, training=False).numpy()
    assert np.abs(loaded(x).numpy() - expected).max() < 1e-5
    out = loaded.signatures["serving_default"](images=tf.constant(x))
    assert np.abs(out["projection"].numpy() - model.encoder_q.head(expected).numpy()).max() < 1e-5
    # Another size, and training mode on a batch of 3 (not a multiple of bn_groups).
    assert loaded(np.random.rand(3, 40, 24, 3).astype(np.float32), training=True).shape == (3, 512)


def test_export_moco_inside_a_distribution_strategy(tmp_path):
    """As train.py exports at the end of training: model and export under MirroredStrategy."""
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = MoCo(arch="resnet18", dim=16, queue_size=8, mlp=False)
        randomize(model.backbone_q)
        path = hub.export_moco(model, str(tmp_path / "e"))
    loaded = tf.saved_model.load(path)
    x = np.random.RandomState(3).rand(2, 40, 40, 3).astype(np.float32)
    expected = model.backbone_q((x - MEAN) / STD, training=False).numpy()
    assert np.abs(loaded(x).numpy() - expected).max() < 1e-5
    assert len(loaded.trainable_variables) == 60


# ---------------------------------------------------------------- what an export may replace


@pytest.fixture
def user_files(tmp_path):
    """A run's model_dir, a folder of photos and a file, as a user has them."""
    run_dir = tmp_path / "runs" / "q"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.json").write_text('{"arch": "resnet18"}')
    (run_dir / "checkpoints" / "ckpt-3.index").write_bytes(b"\x00index")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "lookalike" / "assets").mkdir(parents=True)  # an export's file names, not its content
    (tmp_path / "lookalike" / "saved_model.pb").write_bytes(b"")
    (tmp_path / "lookalike" / "assets" / "moco_config.json").write_text('{"user": "mine"}')
    return tmp_path


@pytest.mark.parametrize(
    "target, message",
    [
        ("runs/q", "it is .*runs/q, which must stay untouched"),  # the model_dir itself
        ("runs", "it contains .*runs/q"),  # a parent of it
        (".", "it contains .*runs/q"),
        ("runs/q/checkpoints", "it is inside .*runs/q"),
        ("runs/q/hub", "it is inside .*runs/q"),  # even a new folder: the model_dir is the run's
        ("photos", "it is not a moco_tf export"),
        ("lookalike", "it is not a moco_tf export"),
        ("notes.txt", "it is a file"),
    ],
)
def test_refuses_to_replace_what_is_no_export_even_with_overwrite(user_files, target, message):
    before = tree(user_files)
    with pytest.raises(atomic_write.TargetError, match=message) as error:
        hub.export_backbone(
            tiny_backbone(), str(user_files / target), {"arch": "resnet18"}, overwrite=True,
            protected=[str(user_files / "runs" / "q")],
        )
    assert "\n" not in str(error.value)
    assert tree(user_files) == before


def test_refuses_an_export_holding_other_files_and_symlinks(tmp_path):
    target = str(tmp_path / "e")
    hub.export_backbone(tiny_backbone(), target, {"arch": "resnet18"})
    (tmp_path / "e" / "my_results.csv").write_text("1,2,3")
    os.symlink(target, tmp_path / "link")
    before = tree(tmp_path)
    with pytest.raises(atomic_write.TargetError, match="besides a moco_tf export it holds my_results.csv"):
        hub.export_backbone(tiny_backbone(), target, {"arch": "resnet18"}, overwrite=True)
    with pytest.raises(atomic_write.TargetError, match="symbolic link"):
        hub.check_export_target(str(tmp_path / "link"), overwrite=True)
    assert tree(tmp_path) == before


def test_current_directory_and_empty_folder(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    with pytest.raises(atomic_write.TargetError, match="current directory"):
        hub.check_export_target(".", overwrite=True)
    with pytest.raises(atomic_write.TargetError, match="current directory"):
        hub.check_export_target(str(tmp_path), overwrite=True)
    monkeypatch.chdir(tmp_path)
    # An empty folder holds nothing to lose: written without overwrite.
    hub.export_backbone(tiny_backbone(), "empty", {"arch": "resnet18", "tag": 1})
    assert hub.read_config("empty")["tag"] == 1
    assert hub.export_source("empty") is None and hub.export_source("absent") is None


def test_export_command_protects_its_model_dir(user_files):
    """What `python -m moco_tf.export --model_dir=runs/q --export_dir=... --overwrite` does (the
    CLI reports the FileExistsError in one line, see test_cli_refuses_to_overwrite_in_one_line)."""
    before = tree(user_files)
    run_dir = user_files / "runs" / "q"
    for target in (run_dir, user_files / "runs", run_dir / "checkpoints"):
        with pytest.raises(atomic_write.TargetError, match="must stay untouched"):
            hub.export_model_dir(str(run_dir), str(target), overwrite=True)
    assert tree(user_files) == before


def _kill_leftover(tmp_path, target: str) -> str:
    """What a kill between the two renames of an overwrite leaves: export_dir gone, the previous
    export inside the staging folder, a new one half-written beside it."""
    staging = tmp_path / ".e.k1ll3d_x.tmp"
    staging.mkdir()
    os.rename(target, staging / "old")
    (staging / "new" / "variables").mkdir(parents=True)
    (staging / "new" / "variables" / "variables.data-00000-of-00001").write_bytes(b"half")
    # A pid no process has (above the kernel's pid_max), on this host: the writer is gone.
    (staging / "owner.json").write_text(json.dumps({"pid": 2**30, "host": socket.gethostname()}))
    return str(staging)


def test_leftovers_of_a_killed_export_are_restored_or_removed(tmp_path):
    target = str(tmp_path / "e")
    hub.export_backbone(tiny_backbone(), target, {"arch": "resnet18", "tag": 1})
    exported = tree(target)
    staging = _kill_leftover(tmp_path, target)
    assert not os.path.exists(target)
    # Also: a staging folder of a live process (this one), one holding a user's file, and another
    # export's: none is ours to remove.
    live = tmp_path / ".e.l1ve0000.tmp"
    live.mkdir()
    (live / "owner.json").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    foreign = tmp_path / ".e.f0r31gn0.tmp"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("mine")
    other = tmp_path / ".other.abcd1234.tmp"
    other.mkdir()
    kept = tree(tmp_path / ".e.f0r31gn0.tmp"), tree(live), tree(other)

    with pytest.raises(atomic_write.TargetError, match="already exists"):
        hub.check_export_target(target)  # the previous export is back, so it exists
    assert tree(target) == exported
    assert not os.path.exists(staging)
    assert (tree(foreign), tree(live), tree(other)) == kept


def test_kill_between_the_renames_then_rerun(tmp_path):
    """A real SIGKILL inside an overwrite (after the old export moved aside, before the new one
    is in place); the next export puts the old one back, then replaces it."""
    target = str(tmp_path / "e")
    hub.export_backbone(tiny_backbone(), target, {"arch": "resnet18", "tag": 1})
    exported = tree(target)
    script = tmp_path / "killed.py"
    script.write_text(
        "import os, signal, sys\n"
        "from moco_tf.interop import hub\n"
        "from tests.support.helpers import tiny_backbone\n"
        "rename = os.rename\n"
        "def killing_rename(src, dst):\n"
        "    rename(src, dst)\n"
        "    if src == sys.argv[1]:  # the old export was just moved aside\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "os.rename = killing_rename\n"
        "hub.export_backbone(tiny_backbone(), sys.argv[1], {'arch': 'resnet18', 'tag': 2}, overwrite=True)\n"
    )
    result = run(str(script), target)
    assert result.returncode == -9, result.stderr[-2000:]
    assert not os.path.exists(target) and len(os.listdir(tmp_path)) == 2  # script + staging
    hub.check_export_target(target, overwrite=True)
    assert tree(target) == exported and sorted(os.listdir(tmp_path)) == ["e", "killed.py"]
    hub.export_backbone(tiny_backbone(), target, {"arch": "resnet18", "tag": 3}, overwrite=True)
    assert hub.read_config(target)["tag"] == 3


@pytest.mark.parametrize("failing_call", [1, 2])
def test_interrupted_rename_keeps_the_old_export(tmp_path, monkeypatch, failing_call):
    target = str(tmp_path / "e")
    hub.export_backbone(tiny_backbone(), target, {"arch": "resnet18", "tag": 1})
    exported = tree(target)
    rename, calls = os.rename, []

    def interrupted(src, dst):
        calls.append(src)
        if len(calls) == failing_call:
            raise KeyboardInterrupt
        rename(src, dst)

    monkeypatch.setattr(os, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        hub.export_backbone(tiny_backbone(), target, {"arch": "resnet18", "tag": 2}, overwrite=True)
    assert tree(target) == exported and os.listdir(tmp_path) == ["e"]


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        tf.errors.ResourceExhaustedError(None, None, "writing x; No space left on device"),
    ],
)
def test_full_disk_keeps_the_previous_export(tmp_path, monkeypatch, error):
    target = str(tmp_path / "e")
    hub.export_backbone(tiny_backbone(), target, {"arch": "resnet18", "tag": 1})
    exported = tree(target)

    def full(*args, **kwargs):
        raise error

    monkeypatch.setattr(tf.saved_model, "save", full)
    with pytest.raises(atomic_write.DiskFullError) as raised:
        hub.export_backbone(tiny_backbone(), target, {"arch": "resnet18", "tag": 2}, overwrite=True)
    assert str(raised.value) == (
        f"no space left on device while writing export {target}; the previous export is intact; "
        "free some space and rerun"
    )
    assert tree(target) == exported and os.listdir(tmp_path) == ["e"]
    with pytest.raises(atomic_write.DiskFullError, match="no export was written"):
        hub.export_backbone(tiny_backbone(), str(tmp_path / "new"), {"arch": "resnet18"})
    assert os.listdir(tmp_path) == ["e"]


def test_export_from_a_checkpoint_prefix(tmp_path):
    from moco_tf.training import checkpoint

    model = MoCo(arch="resnet18", width=8, dim=16, queue_size=8, cifar_stem=True)
    randomize(model.backbone_q)
    run_dir = str(tmp_path / "run")
    checkpoint.write_model_dir(run_dir, model, {"image_size": 32, "dataset": "digits"})
    prefix = os.path.join(run_dir, "checkpoints", "ckpt-0")
    for inside in (os.path.join(run_dir, "checkpoints"), run_dir):
        with pytest.raises(atomic_write.TargetError, match="must stay untouched"):
            hub.export_model_dir(prefix, inside, overwrite=True)
    with pytest.raises(FileNotFoundError, match="neither a folder nor a checkpoint prefix"):
        hub.export_model_dir(os.path.join(run_dir, "checkpoints", "ckpt-7"), str(tmp_path / "e"))
    path = hub.export_model_dir(prefix, str(tmp_path / "e"))
    config = hub.read_config(path)
    assert config["checkpoint"] == "ckpt-0" and config["source"] == f"moco_tf model_dir {os.path.abspath(run_dir)}"
    assert hub.export_source(path) == config["source"]
    x = np.random.RandomState(4).rand(2, 32, 32, 3).astype(np.float32)
    expected = model.backbone_q((x - MEAN) / STD, training=False).numpy()
    assert np.abs(tf.saved_model.load(path)(x).numpy() - expected).max() < 1e-5


# ---------------------------------------------------------------- size and TFLite


def variables_bytes(path: str) -> int:
    folder = os.path.join(path, "variables")
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if ".data-" in f)


def test_each_weight_is_saved_once(exported, tmp_path):
    """4 bytes per live float32 value, within 5%: ResNet-18 at width 64 with a head (the shared
    export), ResNet-50 at width 16 without one (width 64 measured in export/README.md)."""
    path, _ = exported
    backbone, head = resnet("resnet18"), projection_head(512, 16, mlp=True)
    head.build((None, 512))
    cases = [(path, backbone.weights + head.weights)]
    r50 = resnet("resnet50", width=16)
    cases.append((hub.export_backbone(r50, str(tmp_path / "r50"), {"arch": "resnet50"}), r50.weights))
    for where, weights in cases:
        live = sum(int(np.prod(w.shape)) for w in weights)
        ratio = variables_bytes(where) / (4 * live)
        print(f"{os.path.basename(where)}: {live} values, {variables_bytes(where)} bytes, {ratio:.4f} x 4 bytes")
        assert 1.0 <= ratio < 1.05, ratio
        keys = [name for name, _ in tf.train.list_variables(os.path.join(where, "variables", "variables"))]
        saved = [k for k in keys if k.endswith("VARIABLE_VALUE")]
        assert len(saved) == len(weights) and all(k.startswith("variables/") for k in saved), saved[:5]


def test_tflite_matches_the_saved_model(tmp_path):
    """serving_default converts with dynamic height, width and batch; two input sizes."""
    import warnings

    backbone = resnet("resnet18", width=8)
    randomize(backbone, seed=5)
    head = projection_head(64, 16, mlp=True)
    path = hub.export_backbone(backbone, str(tmp_path / "e"), {"arch": "resnet18"}, head=head)
    converter = tf.lite.TFLiteConverter.from_saved_model(path, signature_keys=["serving_default"])
    flatbuffer = converter.convert()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter points to ai_edge_litert
        runner = tf.lite.Interpreter(model_content=flatbuffer).get_signature_runner("serving_default")
    loaded = tf.saved_model.load(path)
    for shape in [(2, 64, 64, 3), (3, 72, 40, 3)]:
        x = np.random.RandomState(sum(shape)).rand(*shape).astype(np.float32)
        lite = runner(images=x)
        saved = loaded.signatures["serving_default"](images=tf.constant(x))
        for key in ("feature_vector", "projection"):
            reference = saved[key].numpy()
            # Within 1e-5 of the output's scale (an untrained ResNet's features reach ~20 here,
            # where float32 steps by 2e-6; seen: 7.6e-6 absolute, 4e-7 of the scale).
            scale = max(1.0, float(np.abs(reference).max()))
            diff = np.abs(lite[key] - reference).max()
            print(f"tflite {shape} {key}: max abs diff {diff:.2e}, {diff / scale:.1e} of max |value| {scale:.2f}")
            assert lite[key].shape == reference.shape and diff <= 1e-5 * scale, (shape, key, diff, scale)
