"""TF-Hub export: layout, atomic writing, and every consumer, each in a fresh process.

A ResNet-18 with random BatchNorm statistics on small images keeps this fast; the numerics
of full-size ResNet-18/50 against PyTorch are in test_convert.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from moco_tf import export
from moco_tf.model import MoCo, projection_head
from moco_tf.resnet import resnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = os.path.join(ROOT, ".venv", "bin", "python")
if not os.path.exists(PYTHON):
    PYTHON = sys.executable
MEAN = np.array(export.IMAGENET_MEAN, np.float32)
STD = np.array(export.IMAGENET_STD, np.float32)
CONFIG = {"arch": "resnet18", "moco_version": "v2", "epochs": 3, "dataset": "digits"}


def randomize(model, seed: int = 0) -> None:
    """Random BN affine parameters and statistics, so inference and training modes differ."""
    rng = np.random.RandomState(seed)
    for weight in model.weights:
        name = weight.path.rsplit("/", 1)[-1]
        shape = tuple(weight.shape)
        if name in ("gamma", "moving_variance"):
            weight.assign(rng.uniform(0.5, 1.5, shape).astype(np.float32))
        elif name in ("beta", "moving_mean"):
            weight.assign(rng.normal(0.0, 0.1, shape).astype(np.float32))


def run(*args, timeout=300):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_ENABLE_ONEDNN_OPTS="0", PYTHONPATH=ROOT)
    return subprocess.run([PYTHON, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(export path, npz with images in [0, 1] and the Keras backbone's features / projections)."""
    backbone = resnet("resnet18")
    randomize(backbone)
    head = projection_head(512, 16, mlp=True)
    root = tmp_path_factory.mktemp("hub")
    path = export.export_backbone(backbone, str(root / "exports" / "r18"), CONFIG, head=head)
    x = np.random.RandomState(1).rand(4, 40, 56, 3).astype(np.float32)
    features = backbone((x - MEAN) / STD, training=False).numpy()
    data = root / "data.npz"
    np.savez(data, x=x, features=features, projection=head(features).numpy())
    return path, str(data)


def test_layout_and_config(exported):
    path, _ = exported
    assert sorted(os.listdir(path)) == ["assets", "fingerprint.pb", "saved_model.pb", "variables"]
    assert os.listdir(os.path.dirname(path)) == ["r18"], "staging folders left behind"
    config = export.read_config(path)
    assert {k: config[k] for k in CONFIG} == CONFIG
    assert config["feature_dim"] == 512 and config["projection_dim"] == 16
    assert config["preprocessing"]["mean"] == list(export.IMAGENET_MEAN)


def tiny_backbone():
    """Any images -> features Keras model exports; this one saves in a fraction of a second."""
    import keras

    inputs = keras.Input((None, None, 3))
    features = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 1)(inputs))
    return keras.Model(inputs, features)


def test_refuses_to_overwrite_then_replaces(tmp_path):
    backbone = tiny_backbone()
    target = str(tmp_path / "e")
    export.export_backbone(backbone, target, {"arch": "resnet18", "tag": 1})
    with pytest.raises(FileExistsError, match="overwrite"):
        export.export_backbone(backbone, target, {"arch": "resnet18", "tag": 2})
    assert export.read_config(target)["tag"] == 1
    export.export_backbone(backbone, target, {"arch": "resnet18", "tag": 2}, overwrite=True)
    assert export.read_config(target)["tag"] == 2
    assert os.listdir(tmp_path) == ["e"]


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tf.saved_model, "save", fail)
    with pytest.raises(KeyboardInterrupt):
        export.export_backbone(tiny_backbone(), str(tmp_path / "e"), {"arch": "resnet18"})
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
    result = run(os.path.join(ROOT, "export", "example.py"), f"--export_dir={path}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "feature_vector (2, 512)" in result.stdout, result.stdout


def test_cli_refuses_to_overwrite_in_one_line(exported, tmp_path):
    path, _ = exported
    result = run("-m", "moco_tf.export", f"--model_dir={tmp_path}", f"--export_dir={path}")
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "already exists" in last and "--overwrite" in last, result.stderr


def test_missing_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export.export_model_dir(str(tmp_path / "absent"), str(tmp_path / "e"))


def test_export_moco_frees_image_size_and_bn_groups(tmp_path):
    model = MoCo(
        arch="resnet18", dim=16, queue_size=8, mlp=True, bn_groups=2, cifar_stem=True, image_size=32
    )
    randomize(model.backbone_q)
    path = export.export_moco(model, str(tmp_path / "e"), {"epochs": 1})
    config = export.read_config(path)
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
        path = export.export_moco(model, str(tmp_path / "e"))
    loaded = tf.saved_model.load(path)
    x = np.random.RandomState(3).rand(2, 40, 40, 3).astype(np.float32)
    expected = model.backbone_q((x - MEAN) / STD, training=False).numpy()
    assert np.abs(loaded(x).numpy() - expected).max() < 1e-5
    assert len(loaded.trainable_variables) == 60
