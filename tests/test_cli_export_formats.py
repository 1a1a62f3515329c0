"""`python -m moco_tf.export --format=keras_hub|pth|onnx`: each format against its real client.

One ResNet-18 (width 64, random weights and BatchNorm statistics, MoCo v2 head) in a moco_tf
model_dir is written once per format for the module; inputs are small (64x64 and the non-square
64x96) to keep the suite's budget.
- pth: torch.load(weights_only=True); moco_tf.convert of it equals the TF-Hub export (1e-6); a
  torchvision ResNet (torchvision if installed, else tests/support/torch_reference.py's copy of its
  layout) gives moco_tf's features; main_lincls.py's key handling; the detectron2 renaming of
  facebookresearch/moco's detection/convert-pretrain-to-detectron2.py, re-implemented here.
- keras_hub: ResNetBackbone.from_preset pooled output and P2..P5, ImageClassifier.from_preset.
- onnx: onnxruntime against the SavedModel's serving_default and feature_maps.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import tensorflow as tf

torch = pytest.importorskip("torch")

from moco_tf import atomic_write, export  # noqa: E402
from moco_tf.interop import hub, targets, transfer  # noqa: E402
from moco_tf.interop import keras_hub as to_keras_hub  # noqa: E402
from moco_tf.interop import onnx as to_onnx  # noqa: E402
from moco_tf.interop import torch as to_torch  # noqa: E402
from moco_tf.models.backbones import BackboneSpec  # noqa: E402
from moco_tf.models.moco import MoCo  # noqa: E402
from moco_tf.weights import torch_checkpoint  # noqa: E402
from tests.support import torch_reference  # noqa: E402
from tests.support.helpers import randomize, run  # noqa: E402

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
SIZES = ((64, 64), (64, 96))
DIM = 16


def _relative(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-12))


def _images(size, seed=0):
    return np.random.RandomState(seed).rand(2, *size, 3).astype(np.float32)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    from moco_tf.training import checkpoint

    tf.keras.utils.set_random_seed(0)
    root = tmp_path_factory.mktemp("transfer")
    model = MoCo(arch="resnet18", width=64, dim=DIM, queue_size=8, mlp=True)
    randomize(model.backbone_q, seed=1)
    run_dir = str(root / "run")
    checkpoint.write_model_dir(run_dir, model, {"image_size": 64, "dataset": "digits"})
    paths = {"run": run_dir, "root": root}
    paths["pth"] = export.export(run_dir, str(root / "moco.pth.tar"), "pth")
    return paths


@pytest.fixture(scope="module")
def converted(made):
    """`moco_tf.convert --torch_checkpoint=moco.pth.tar --export_dir=...`: the TF-Hub SavedModel
    the ONNX model is checked against too (once it is checked equal to the source)."""
    return to_torch.convert_to_export(made["pth"], str(made["root"] / "converted"))


@pytest.fixture(scope="module")
def encoder(made):
    return transfer.load_encoder(made["run"])


def _torch_resnet18(fc=None):
    try:
        import torchvision

        net = torchvision.models.resnet18()
        net.fc = fc if fc is not None else torch.nn.Identity()
        return net
    except ImportError:
        return torch_reference.ResNet(18, fc=fc)


# ---------------------------------------------------------------------------------------- pth


def test_pth_is_the_official_layout_tensors_only(made, encoder):
    checkpoint = torch.load(made["pth"], map_location="cpu", weights_only=True)
    assert set(checkpoint) == {"epoch", "arch", "state_dict", "moco_tf"}
    assert checkpoint["arch"] == "resnet18" and checkpoint["epoch"] == 0
    state = checkpoint["state_dict"]
    assert all(k.startswith("module.encoder_q.") for k in state)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    head = {f"module.encoder_q.fc.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    assert {k for k in state if ".fc." in k} == head
    own = torch_reference.ResNet(18, fc=torch_reference.moco_head(512, DIM, mlp=True)).state_dict()
    assert {k.removeprefix("module.encoder_q.") for k in state} == set(own)
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        f"module.encoder_q.{k}": tuple(v.shape) for k, v in own.items()
    }


def test_pth_converts_back_to_the_same_export(converted, encoder):
    # The export of the source would list the backbone's weights, then the head's (interop.hub).
    source = [np.asarray(w) for w in encoder.backbone.weights + encoder.head.weights]
    back = tf.saved_model.load(converted)
    assert [v.shape for v in source] == [tuple(v.shape) for v in back.variables]
    assert max(_relative(b.numpy(), s) for s, b in zip(source, back.variables, strict=True)) <= 1e-6
    x = _images(SIZES[1])
    ours = back.signatures["serving_default"](images=tf.constant(x))
    features = encoder.backbone((x - MEAN) / STD, training=False)
    theirs = {"feature_vector": features, "projection": encoder.head(features, training=False)}
    assert set(ours) == set(theirs)
    # the same weights (above); outputs differ only by the order of float operations (graph vs eager)
    assert max(_relative(ours[k], theirs[k]) for k in ours) <= 1e-5


def test_torch_resnet_loaded_with_it_gives_moco_tf_features(made, encoder):
    state = torch.load(made["pth"], map_location="cpu", weights_only=True)["state_dict"]
    state = {k.removeprefix("module.encoder_q."): v for k, v in state.items()}
    net = _torch_resnet18(fc=torch_reference.moco_head(512, DIM, mlp=True))
    net.load_state_dict(state, strict=True)
    net.eval()
    for size in SIZES:
        x = _images(size, seed=2)
        normalised = (x - MEAN) / STD
        with torch.no_grad():
            projection = net(torch.from_numpy(normalised.transpose(0, 3, 1, 2).copy())).numpy()
            net_fc, net.fc = net.fc, torch.nn.Identity()
            features = net(torch.from_numpy(normalised.transpose(0, 3, 1, 2).copy())).numpy()
            net.fc = net_fc
        ours = encoder.backbone(normalised, training=False).numpy()
        assert _relative(features, ours) < 1e-5, size
        assert _relative(projection, encoder.head(ours, training=False).numpy()) < 1e-5, size


def test_main_lincls_key_handling_accepts_it(made):
    # main_lincls.py: keep module.encoder_q.* but its fc, strip the prefix, load non-strictly.
    state = torch.load(made["pth"], map_location="cpu", weights_only=True)["state_dict"]
    for k in list(state.keys()):
        if k.startswith("module.encoder_q") and not k.startswith("module.encoder_q.fc"):
            state[k[len("module.encoder_q.") :]] = state[k]
        del state[k]
    net = _torch_resnet18(fc=torch.nn.Linear(512, 10))
    message = net.load_state_dict(state, strict=False)
    assert set(message.missing_keys) == {"fc.weight", "fc.bias"} and not message.unexpected_keys


def _detectron2_name(key: str) -> str:
    """The renaming rules of facebookresearch/moco detection/convert-pretrain-to-detectron2.py,
    applied to a key that starts with module.encoder_q."""
    k = key.replace("module.encoder_q.", "")
    if "layer" not in k:
        k = "stem." + k
    for t in (1, 2, 3, 4):
        k = k.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        k = k.replace(f"bn{t}", f"conv{t}.norm")
    return k.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def _detectron2_resnet_names(arch: str) -> set[str]:
    """detectron2's ResNet parameter and buffer names (build_resnet_backbone: stem.conv1 with
    its norm; resN.M.conv1..conv2 (basic) / conv3 (bottleneck), each with .norm; a shortcut
    conv + norm where a block changes shape), written from detectron2's module layout."""
    kind, blocks = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet50": ("bottleneck", (3, 4, 6, 3))}[arch]
    norm = ("weight", "bias", "running_mean", "running_var")
    convs = ["stem.conv1"]
    for stage, count in enumerate(blocks, start=2):
        for block in range(count):
            prefix = f"res{stage}.{block}"
            convs += [f"{prefix}.conv{i}" for i in ((1, 2) if kind == "basic" else (1, 2, 3))]
            if block == 0 and (kind == "bottleneck" or stage > 2):
                convs.append(f"{prefix}.shortcut")
    return {f"{c}.weight" for c in convs} | {f"{c}.norm.{p}" for c in convs for p in norm}


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_detectron2_conversion_renames_every_backbone_weight(arch, made):
    if arch == "resnet18":
        state = torch.load(made["pth"], map_location="cpu", weights_only=True)["state_dict"]
    else:  # the bottleneck layout: conv3/bn3 and a shortcut in every stage (weights never computed)
        tensors = torch_checkpoint.torch_state_dict(BackboneSpec(arch).build())
        state = {f"module.encoder_q.{k}": v for k, v in tensors.items()}
    renamed = {
        _detectron2_name(k): k
        for k in state
        if k.startswith("module.encoder_q.") and ".fc" not in k and not k.endswith("num_batches_tracked")
    }
    assert set(renamed) == _detectron2_resnet_names(arch)


# --------------------------------------------------------------------------------- keras_hub


@pytest.fixture(scope="module")
def preset(made):
    pytest.importorskip("keras_hub")
    # from the .pth.tar (anything --pretrained takes); compared below with the model_dir's encoder
    return export.export(made["pth"], str(made["root"] / "preset"), "keras_hub")


def test_keras_hub_backbone_from_preset_equals_moco_tf(preset, encoder):
    import keras
    import keras_hub

    assert sorted(os.listdir(preset)) == ["config.json", "model.safetensors"]
    backbone = keras_hub.models.ResNetBackbone.from_preset(preset)
    theirs = keras.Model(backbone.inputs, [backbone.pyramid_outputs[f"P{i}"] for i in (2, 3, 4, 5)])
    stages = hub.stage_outputs(encoder.backbone).values()
    ours = keras.Model(encoder.backbone.inputs, [encoder.backbone.output, *stages])
    for size in SIZES:
        x = (_images(size, seed=3) - MEAN) / STD
        pooled, *maps = ours(x, training=False)
        pyramid = theirs(x, training=False)
        assert _relative(np.mean(np.asarray(backbone(x, training=False)), axis=(1, 2)), pooled) <= 1e-5, size
        for level, (a, b) in enumerate(zip(pyramid, maps, strict=True), start=2):
            assert a.shape == b.shape and _relative(a, b) <= 1e-5, (size, level)


def test_keras_hub_image_classifier_from_preset(preset, encoder):
    import keras_hub

    classifier = keras_hub.models.ImageClassifier.from_preset(preset, num_classes=3)
    converter = classifier.preprocessor.image_converter
    x = _images((224, 224), seed=4)
    # KerasHub's converter takes 0-255 images: (x / 255 - mean) / std, moco_tf's normalisation.
    assert _relative(np.asarray(converter(x * 255.0)), (x - MEAN) / STD) < 1e-5
    assert classifier.predict(x[:, :64, :96] * 255.0, verbose=0).shape == (2, 3)
    config = json.load(open(os.path.join(preset, "config.json")))
    assert config["pretrained_cfg"]["mean"] == list(MEAN.astype(float).round(3)) and "moco_tf" in config


def test_keras_hub_refuses_what_it_cannot_represent():
    cases = (
        (BackboneSpec("resnet18", width=8), "width is 8"),
        (BackboneSpec("resnet18", cifar_stem=True), "CIFAR stem"),
    )
    for spec, why in cases:
        with pytest.raises(atomic_write.TargetError) as raised:
            to_keras_hub.check_representable(spec)
        message = str(raised.value)
        assert why in message and "--format=hub" in message and "--format=pth" in message and "\n" not in message


# -------------------------------------------------------------------------------------- onnx


def test_onnx_matches_the_saved_model(made, converted):
    import onnx
    import onnxruntime

    path = export.export(made["run"], str(made["root"] / "moco.onnx"), "onnx")
    model = onnx.load(path)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [to_onnx.OPSET]
    assert json.loads({p.key: p.value for p in model.metadata_props}["moco_tf"])["arch"] == "resnet18"
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert set(names) == {"feature_vector", "projection", "layer1", "layer2", "layer3", "layer4"}
    saved = tf.saved_model.load(converted)
    for size in SIZES:
        x = _images(size, seed=5)
        expected = {
            **saved.signatures["serving_default"](images=tf.constant(x)),
            **saved.signatures["feature_maps"](images=tf.constant(x)),
        }
        got = dict(zip(names, session.run(None, {"images": x}), strict=True))
        for name, value in expected.items():
            assert got[name].shape == tuple(value.shape) and _relative(got[name], value) <= 1e-5, (size, name)


# ------------------------------------------------------------------------------- export rules


def test_files_not_written_by_moco_tf_are_never_replaced(made, encoder, tmp_path):
    foreign_pth = tmp_path / "theirs.pth.tar"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign_pth)
    foreign_onnx = tmp_path / "theirs.onnx"
    foreign_onnx.write_bytes(b"not onnx")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("mine")
    cases = [
        (to_torch.check_pth_target, foreign_pth, "no PyTorch checkpoint written by moco_tf"),
        (to_onnx.check_target, foreign_onnx, "no ONNX model written by moco_tf"),
        (to_torch.check_pth_target, tmp_path / "folder", "it is a folder"),
        (to_keras_hub.check_target, tmp_path / "folder", "not a KerasHub preset written by moco_tf"),
        (to_keras_hub.check_target, foreign_pth, "it is a file"),
    ]
    for check, target, why in cases:
        with pytest.raises(atomic_write.TargetError, match=why):
            check(str(target), True)
    # the source is protected whatever --overwrite says
    with pytest.raises(atomic_write.TargetError, match="must stay untouched"):
        export.export(made["pth"], made["pth"], "pth", overwrite=True)
    # moco_tf's own file: only with overwrite, replaced atomically (nothing left beside it)
    ours = str(tmp_path / "ours.pth.tar")
    to_torch.write_official_checkpoint(encoder, ours)
    with pytest.raises(atomic_write.TargetError, match="already exists; pass --overwrite"):
        to_torch.write_official_checkpoint(encoder, ours)
    to_torch.write_official_checkpoint(encoder, ours, overwrite=True)
    assert to_torch.is_moco_tf_checkpoint(ours)
    assert sorted(os.listdir(tmp_path)) == ["folder", "ours.pth.tar", "theirs.onnx", "theirs.pth.tar"]
    assert foreign_onnx.read_bytes() == b"not onnx" and (tmp_path / "folder" / "notes.txt").read_text() == "mine"


def test_a_file_moved_aside_by_a_killed_replacement_is_put_back(made, tmp_path):
    # A kill between the two renames of atomic_write.replace: the old file sits in the staging folder.
    target = str(tmp_path / "m.pth.tar")
    staging = tmp_path / ".m.pth.tar.abcd1234.tmp"
    staging.mkdir()
    with open(made["pth"], "rb") as f:
        (staging / "old").write_bytes(f.read())
    to_torch.check_pth_target(target, overwrite=True)
    assert os.listdir(tmp_path) == ["m.pth.tar"] and to_torch.is_moco_tf_checkpoint(target)


def test_a_missing_extra_is_one_line_naming_pip():
    with pytest.raises(targets.MissingExtraError) as raised:
        targets.require("no_such_module_for_moco_tf", "onnx", "--format=onnx")
    message = str(raised.value)
    assert "\n" not in message and "pip install tf2onnx onnxruntime" in message and '".[onnx]"' in message


def test_cli_refuses_in_one_line(made, tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "notes.txt").write_text("mine")
    result = run("-m", "moco_tf.export", f"--pretrained={made['pth']}", f"--export_dir={tmp_path}/p", "--format=pth")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert re.search(r"^error: refusing to replace .*/p: it is a folder", result.stderr.strip().splitlines()[-1])
    assert os.listdir(tmp_path / "p") == ["notes.txt"]


@pytest.mark.slow  # about a minute on 2 cores: outside the CI budget
def test_keras_hub_example_trains_retinanet_and_deeplab(preset):
    result = run("export/keras_hub_example.py", f"--preset={preset}", "--steps=1", "--batch_size=2", "--image_size=96")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "retinanet loss" in result.stdout and "deeplabv3 loss" in result.stdout, result.stdout
