"""PyTorch MoCo checkpoints -> moco_tf: keys, layouts, numerics against torch, and safety.

The reference is a plain-torch ResNet with torchvision's exact module and key layout
(torchvision itself is not a dependency), random weights and random BatchNorm statistics,
saved as the official MoCo code saves its checkpoints.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from moco_tf.interop import torch as from_torch  # noqa: E402
from moco_tf.models.moco import MoCo, projection_head  # noqa: E402
from moco_tf.models.resnet import resnet  # noqa: E402
from moco_tf.weights import torch_checkpoint  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = os.path.join(ROOT, ".venv", "bin", "python")
if not os.path.exists(PYTHON):
    PYTHON = sys.executable
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
SIZES = ((224, 224), (225, 193))  # (height, width); the odd one checks padding parity
TOLERANCE = 1e-4
QUEUE = 64


# ---------------------------------------------------------------- torchvision-layout ResNet


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # v1.5
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    def __init__(self, block, layers, num_classes):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x):
        return self.fc(self.features(x))


TORCH_ARCHS = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet50": (Bottleneck, (3, 4, 6, 3))}


def moco_encoder(arch: str, dim: int, mlp: bool, seed: int) -> ResNet:
    """As moco/builder.py builds encoder_q: ResNet(num_classes=dim), v2 MLP head in front of fc;
    then random affine parameters and BN statistics that keep activations of order one."""
    torch.manual_seed(seed)
    block, layers = TORCH_ARCHS[arch]
    model = ResNet(block, layers, num_classes=dim)
    if mlp:
        width = model.fc.weight.shape[1]
        model.fc = nn.Sequential(nn.Linear(width, width), nn.ReLU(), model.fc)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.1)
            bn.momentum = 1.0  # running stats := the next batch's statistics
        # Small last-BN scales in each residual branch, as trained ResNets have: without them
        # random features grow with depth (~20 for ResNet-50) and float32 rounding alone
        # (torch float32 vs float64) exceeds 1e-4.
        for block in [m for m in model.modules() if isinstance(m, BasicBlock | Bottleneck)]:
            (block.bn3 if isinstance(block, Bottleneck) else block.bn2).weight.uniform_(0.1, 0.4)
        model.train()
        model(torch.from_numpy(((images(96, 96, seed=seed) - MEAN) / STD).transpose(0, 3, 1, 2).copy()))
        for bn in bns:  # perturb so they are not exact batch statistics either
            bn.running_mean.add_(torch.randn_like(bn.running_mean) * 0.05)
            bn.running_var.mul_(torch.empty_like(bn.running_var).uniform_(0.8, 1.25))
            bn.momentum = 0.1
    return model.eval()


def images(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Two RGB images in [0, 1], NHWC, as a TF-Hub consumer passes them."""
    return np.random.RandomState(seed).rand(2, height, width, 3).astype(np.float32)


def torch_outputs(model: ResNet, x01: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = torch.from_numpy(((x01 - MEAN) / STD).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        features = model.features(x)
        return features.numpy(), model.fc(features).numpy()


def official_checkpoint(arch: str, mlp: bool, dim: int = 128) -> tuple[dict, ResNet]:
    """What moco/main_moco.py saves: DataParallel-prefixed encoder_q, encoder_k, queue."""
    encoder_q = moco_encoder(arch, dim, mlp, seed=1)
    encoder_k = moco_encoder(arch, dim, mlp, seed=2)  # an EMA of the query: other values
    state = {f"module.encoder_q.{k}": v for k, v in encoder_q.state_dict().items()}
    state.update({f"module.encoder_k.{k}": v for k, v in encoder_k.state_dict().items()})
    queue = nn.functional.normalize(torch.randn(dim, QUEUE), dim=0)
    state.update({"module.queue": queue, "module.queue_ptr": torch.tensor([8], dtype=torch.long)})
    optimizer = torch.optim.SGD(encoder_q.parameters(), 0.03, momentum=0.9, weight_decay=1e-4)
    checkpoint = {"epoch": 200, "arch": arch, "state_dict": state, "optimizer": optimizer.state_dict()}
    return checkpoint, encoder_q


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Per arch: the checkpoint file and torch's features and projections at both sizes."""
    made = {}

    def make(arch: str):
        if arch not in made:
            mlp = arch == "resnet18"  # one v2 (MLP head) and one v1 (fc head) checkpoint
            checkpoint, encoder_q = official_checkpoint(arch, mlp)
            path = tmp_path_factory.mktemp(arch) / "checkpoint_0199.pth.tar"
            torch.save(checkpoint, path)
            outputs = {size: torch_outputs(encoder_q, images(*size)) for size in SIZES}
            made[arch] = (str(path), outputs, mlp)
        return made[arch]

    return make


def run(*args, timeout=300):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_ENABLE_ONEDNN_OPTS="0", PYTHONPATH=ROOT)
    return subprocess.run(
        [PYTHON, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


# ---------------------------------------------------------------- numerics against torch


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_backbone_features_match_torch(reference, arch):
    path, outputs, mlp = reference(arch)
    state = torch_checkpoint.state_dict_of(torch_checkpoint.read_torch_checkpoint(path))
    assert torch_checkpoint.detect_arch(state) == arch
    backbone = resnet(arch)
    report = torch_checkpoint.load_torch_state_dict(backbone, state)
    assert report.layout == "moco" and report.head == ("v2" if mlp else "v1")
    assert "queue" in report.ignored and any(k.startswith("encoder_k.") for k in report.ignored)
    assert any(k.startswith("fc.") for k in report.ignored)
    for size in SIZES:
        x = (images(*size) - MEAN) / STD
        got = backbone(x, training=False).numpy()
        diff = np.abs(got - outputs[size][0]).max()
        print(f"{arch} {size[0]}x{size[1]} backbone max abs diff vs torch: {diff:.2e}")
        assert diff < TOLERANCE, (arch, size, diff)


HUB_CONSUMER = r"""
import sys
import numpy as np, tensorflow as tf, tensorflow_hub as hub, tf_keras
for path, data in zip(sys.argv[1::2], sys.argv[2::2]):
    data = np.load(data)
    model = tf_keras.Sequential([tf_keras.Input((None, None, 3)), hub.KerasLayer(path)])
    loaded = tf.saved_model.load(path)
    for name in ("224x224", "225x193"):
        x = data["x_" + name]
        features = model.predict(x, verbose=0)
        projection = loaded.signatures["serving_default"](images=tf.constant(x))["projection"].numpy()
        diffs = np.abs(features - data["f_" + name]).max(), np.abs(projection - data["p_" + name]).max()
        print(path.rsplit("/", 1)[-1], name, *diffs)
"""


def test_exports_match_torch_through_hub(reference, tmp_path):
    """resnet18 (v2 head) through the CLI, resnet50 (v1 head) through the Python API; then
    both through hub.KerasLayer (features) and serving_default (projection) in a fresh process."""
    consumer_args = []
    for arch in ("resnet18", "resnet50"):
        path, outputs, _ = reference(arch)
        export_dir = tmp_path / "export" / arch
        if arch == "resnet18":
            args = ("-m", "moco_tf.convert", f"--torch_checkpoint={path}", f"--export_dir={export_dir}")
            result = run(*args)
            assert result.returncode == 0, result.stderr[-3000:]
        else:
            from_torch.convert_to_export(path, str(export_dir))
        data = {}
        for (h, w), (features, projection) in outputs.items():
            data.update({f"x_{h}x{w}": images(h, w), f"f_{h}x{w}": features, f"p_{h}x{w}": projection})
        np.savez(tmp_path / f"{arch}.npz", **data)
        consumer_args += [str(export_dir), str(tmp_path / f"{arch}.npz")]
    script = tmp_path / "consumer.py"
    script.write_text(HUB_CONSUMER)
    result = run(str(script), *consumer_args)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.split() for line in result.stdout.strip().splitlines()[-4:]]
    assert len(lines) == 4, result.stdout
    for arch, name, feature_diff, projection_diff in lines:
        print(f"{arch} {name} through hub.KerasLayer: features {float(feature_diff):.2e}, "
              f"projection {float(projection_diff):.2e}")
        assert float(feature_diff) < TOLERANCE and float(projection_diff) < TOLERANCE, lines


# ---------------------------------------------------------------- keys and layouts


def _numpy_state(model: nn.Module, prefix: str = "") -> dict[str, np.ndarray]:
    return {prefix + k: v.numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def r18():
    return moco_encoder("resnet18", 128, mlp=False, seed=3)


@pytest.mark.parametrize("prefix", ["module.encoder_q.", "module.base_encoder.", "module.", "encoder_q.", ""])
def test_prefixes(r18, prefix):
    backbone = resnet("resnet18")
    state = _numpy_state(r18, prefix)
    if prefix == "module.base_encoder.":  # MoCo v3 also saves these; they are not v1/v2 parts
        state["module.momentum_encoder.conv1.weight"] = state["module.base_encoder.conv1.weight"]
        state["module.predictor.0.weight"] = np.zeros((4096, 256), np.float32)
    report = torch_checkpoint.load_torch_state_dict(backbone, state)
    assert report.arch == "resnet18" and not report.cifar_stem
    if prefix == "module.base_encoder.":
        assert {"momentum_encoder.conv1.weight", "predictor.0.weight"} <= set(report.ignored)
    np.testing.assert_array_equal(
        backbone.get_layer("layer3.0.downsample.0").kernel.numpy(),
        r18.layer3[0].downsample[0].weight.detach().numpy().transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        backbone.get_layer("layer4.1.bn2").moving_variance.numpy(), r18.layer4[1].bn2.running_var.numpy()
    )
    expected_head = {"module.encoder_q.": "v1", "encoder_q.": "v1", "module.base_encoder.": "v3_projector"}
    assert report.head == expected_head.get(prefix, "classifier")


def _synthetic_keys(kind: str, blocks: tuple[int, ...]) -> dict[str, np.ndarray]:
    convs = ("conv1", "conv2", "conv3") if kind == "bottleneck" else ("conv1", "conv2")
    keys = {"conv1.weight": np.zeros((64, 3, 7, 7))}
    for stage, count in enumerate(blocks, start=1):
        for index in range(count):
            for conv in convs:
                keys[f"layer{stage}.{index}.{conv}.weight"] = np.zeros(1)
    return keys


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
def test_detect_arch(arch):
    from moco_tf.models.resnet import SPECS

    keys = _synthetic_keys(*SPECS[int(arch[6:])])
    assert torch_checkpoint.detect_arch({f"module.encoder_q.{k}": v for k, v in keys.items()}) == arch


def test_detect_arch_rejects_other_networks():
    with pytest.raises(torch_checkpoint.CheckpointError, match="not a torchvision ResNet"):
        torch_checkpoint.detect_arch(_synthetic_keys("bottleneck", (3, 4, 5, 3)))


def test_mismatches_are_listed_and_nothing_is_written(r18):
    state = _numpy_state(r18, "module.encoder_q.")
    del state["module.encoder_q.layer2.1.bn1.running_mean"]
    state["module.encoder_q.layer5.0.conv1.weight"] = np.zeros((1,))
    state["module.encoder_q.layer1.0.conv1.weight"] = np.zeros((64, 64, 1, 1), np.float32)
    backbone = resnet("resnet18")
    before = backbone.get_layer("conv1").kernel.numpy().copy()
    with pytest.raises(torch_checkpoint.CheckpointError) as error:
        torch_checkpoint.load_torch_state_dict(backbone, state)
    message = str(error.value)
    assert "layer2.1.bn1.running_mean" in message and "missing" in message
    assert "layer5.0.conv1.weight" in message and "unexpected" in message
    assert "layer1.0.conv1.weight" in message and "misshapen" in message
    np.testing.assert_array_equal(backbone.get_layer("conv1").kernel.numpy(), before)


def test_wrong_arch_is_a_clear_error(r18):
    with pytest.raises(torch_checkpoint.CheckpointError, match="missing"):
        torch_checkpoint.load_torch_state_dict(resnet("resnet34"), _numpy_state(r18))


def test_lincls_checkpoint_fc_is_a_classifier(r18):
    classifier = nn.Linear(512, 1000)
    state = _numpy_state(r18, "module.")
    state["module.fc.weight"] = classifier.weight.detach().numpy()
    state["module.fc.bias"] = classifier.bias.detach().numpy()
    head = projection_head(512, 128, mlp=False)
    before = head.get_layer("fc").kernel.numpy().copy()
    report = torch_checkpoint.load_torch_state_dict(resnet("resnet18"), state, head=head)
    assert report.head == "classifier" and "fc.weight" in report.ignored
    np.testing.assert_array_equal(head.get_layer("fc").kernel.numpy(), before)


def test_head_into_bare_backbone_head(r18):
    head = projection_head(512, 128, mlp=False)
    torch_checkpoint.load_torch_state_dict(resnet("resnet18"), _numpy_state(r18, "module.encoder_q."), head=head)
    np.testing.assert_array_equal(head.get_layer("fc").kernel.numpy(), r18.fc.weight.detach().numpy().T)


# ---------------------------------------------------------------- safety and CLI


class RunsCode:
    """Unpickling this would create a file: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_with_pickled_code_is_refused(tmp_path, r18):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": r18.state_dict(), "payload": RunsCode(marker)}, path)
    with pytest.raises(torch_checkpoint.CheckpointError, match="refusing"):
        torch_checkpoint.read_torch_checkpoint(str(path))
    assert not marker.exists()


def test_missing_torch_says_how_to_install(monkeypatch, tmp_path):
    path = tmp_path / "x.pth"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="pip install torch"):
        torch_checkpoint.read_torch_checkpoint(str(path))


def test_cli_user_errors_are_one_line(tmp_path, r18):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": r18.state_dict(), "payload": RunsCode(marker)}, evil)
    result = run("-m", "moco_tf.convert", f"--torch_checkpoint={evil}", f"--export_dir={tmp_path / 'e'}")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "refusing" in last, result.stderr
    assert not marker.exists() and not (tmp_path / "e").exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint" * 8])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "x.pth"
    path.write_bytes(content)
    with pytest.raises(torch_checkpoint.NotACheckpointError, match="is not a checkpoint torch.load can read"):
        torch_checkpoint.read_torch_checkpoint(str(path))


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_torch.convert_to_export(str(tmp_path / "absent.pth"), str(tmp_path / "e"))


# ---------------------------------------------------------------- into a MoCo model


def test_official_checkpoint_into_moco_resumes_a_step(reference):
    import keras

    path, outputs, mlp = reference("resnet18")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint["state_dict"]
    model = MoCo(arch="resnet18", dim=128, queue_size=QUEUE, mlp=mlp)
    report = torch_checkpoint.load_torch_state_dict(model, state)
    assert report.head == "v2" and not report.ignored

    x = (images(*SIZES[1]) - MEAN) / STD
    projection = model.encoder_q(x, training=False).numpy()
    assert np.abs(projection - outputs[SIZES[1]][1]).max() < TOLERANCE
    np.testing.assert_array_equal(
        model.encoder_k.backbone.get_layer("layer2.0.conv1").kernel.numpy(),
        state["module.encoder_k.layer2.0.conv1.weight"].numpy().transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        model.encoder_k.head.get_layer("fc.2").kernel.numpy(), state["module.encoder_k.fc.2.weight"].numpy().T
    )
    np.testing.assert_array_equal(model.queue.numpy(), state["module.queue"].numpy().T)
    assert int(model.queue_ptr.numpy()) == 8

    model.compile(optimizer=keras.optimizers.SGD(0.03, momentum=0.9))
    views = np.random.RandomState(5).normal(size=(2, 8, 32, 32, 3)).astype(np.float32)
    logs = model.train_step((views[0], views[1]))
    assert np.isfinite(float(logs["loss"]))
    assert int(model.queue_ptr.numpy()) == 16


def test_checkpoint_without_moco_head_leaves_the_moco_head(r18):
    model = MoCo(arch="resnet18", dim=128, queue_size=QUEUE, mlp=False)
    before = model.encoder_q.head.get_layer("fc").kernel.numpy().copy()
    report = torch_checkpoint.load_torch_state_dict(model, _numpy_state(r18, "module."))  # lincls-like
    assert report.head == "classifier" and "encoder_q.fc.weight" in report.ignored
    np.testing.assert_array_equal(model.encoder_q.head.get_layer("fc").kernel.numpy(), before)
    # No key encoder in the checkpoint: it starts as a copy of the query encoder.
    for q, k in zip(model.encoder_q.weights, model.encoder_k.weights, strict=True):
        np.testing.assert_array_equal(q.numpy(), k.numpy())


def test_v1_checkpoint_into_v2_model_is_a_clear_error(reference):
    path, _, _ = reference("resnet18")  # a v2 checkpoint
    model = MoCo(arch="resnet18", dim=128, queue_size=QUEUE, mlp=False)
    with pytest.raises(torch_checkpoint.CheckpointError, match="fc.0.weight"):
        torch_checkpoint.load_torch_state_dict(model, torch.load(path, weights_only=True)["state_dict"])


def test_official_checkpoint_to_model_dir_resumes_and_exports(reference, tmp_path):
    checkpoint_module = pytest.importorskip("moco_tf.training.checkpoint")
    import keras

    from moco_tf.interop.hub import export_model_dir, read_config

    path, outputs, _ = reference("resnet18")  # MoCo v2
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    model_dir = str(tmp_path / "model_dir")
    result = run("-m", "moco_tf.convert", f"--torch_checkpoint={path}", f"--model_dir={model_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    model, run_config = checkpoint_module.restore_model(model_dir)
    config = run_config.flat()
    assert (config["arch"], config["mlp"], config["dim"]) == ("resnet18", True, 128)
    assert (config["temperature"], config["schedule"], config["epochs"]) == (0.2, "cosine", 200)
    assert run_config.source.startswith("PyTorch checkpoint")
    assert model.temperature == 0.2
    np.testing.assert_array_equal(model.queue.numpy(), state["module.queue"].numpy().T)
    np.testing.assert_array_equal(
        model.encoder_k.head.get_layer("fc.0").kernel.numpy(), state["module.encoder_k.fc.0.weight"].numpy().T
    )
    if getattr(model, "optimizer", None) is None:
        model.compile(optimizer=keras.optimizers.SGD(0.03, momentum=0.9))
    size = config["image_size"]  # the official runs' 224: the model's input is fixed to it
    views = np.random.RandomState(5).normal(size=(2, 2, size, size, 3)).astype(np.float32)
    assert np.isfinite(float(model.train_step((views[0], views[1]))["loss"]))
    assert int(model.queue_ptr.numpy()) == 10

    export_dir = export_model_dir(model_dir, str(tmp_path / "export"))
    assert read_config(export_dir)["arch"] == "resnet18"


# ---------------------------------------------------------------- what convert may write


def _tree(root) -> dict[str, bytes | None]:
    from tests.support.helpers import tree

    return tree(root)


@pytest.fixture
def tiny_official(tmp_path):
    """An official-layout MoCo v2 checkpoint of a width-8 CIFAR ResNet-18 (fast to convert)."""
    from tests.support import torch_reference

    torch.manual_seed(0)
    encoder = torch_reference.ResNet(18, fc=torch_reference.moco_head(64, 16, mlp=True), cifar_stem=True, width=8)
    state = {f"module.encoder_q.{k}": v for k, v in encoder.state_dict().items()}
    state.update({f"module.encoder_k.{k}": v.clone() for k, v in encoder.state_dict().items()})
    state["module.queue"] = torch.randn(16, 8)
    state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    path = tmp_path / "checkpoint_0001.pth.tar"
    torch.save({"epoch": 1, "arch": "resnet18", "state_dict": state}, path)
    return str(path)


def test_a_directory_as_torch_checkpoint_asks_for_the_file(tmp_path):
    with pytest.raises(torch_checkpoint.CheckpointError, match="is a directory; give the checkpoint file"):
        from_torch.convert_to_export(str(tmp_path), str(tmp_path / "e"))


def test_convert_never_replaces_what_it_did_not_write(tmp_path, tiny_official):
    run_dir = tmp_path / "run"  # a training run
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.json").write_text('{"arch": "resnet18", "source": "PyTorch checkpoint x"}')
    (run_dir / "checkpoints" / "ckpt-0.index").write_bytes(b"i")
    (run_dir / "logs").mkdir()
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    before = _tree(tmp_path)
    cases = [
        (from_torch.convert_to_export, tmp_path / "photos", "not a moco_tf export"),
        (from_torch.convert_to_export, tmp_path, "contains .*checkpoint_0001.pth.tar"),
        (from_torch.convert_to_model_dir, run_dir, "not a model_dir written by moco_tf.convert"),
        (from_torch.convert_to_model_dir, tmp_path / "photos", "not a model_dir written by moco_tf.convert"),
        (from_torch.convert_to_model_dir, tmp_path, "contains .*checkpoint_0001.pth.tar"),
    ]
    for function, target, message in cases:
        with pytest.raises(FileExistsError, match=message):
            function(tiny_official, str(target), overwrite=True)
    assert _tree(tmp_path) == before


def test_converted_model_dir_is_replaced_only_with_overwrite(tmp_path, tiny_official):
    model_dir = str(tmp_path / "from_torch")
    from_torch.convert_to_model_dir(tiny_official, model_dir)
    assert from_torch.is_converted_model_dir(model_dir)
    written = _tree(model_dir)
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        from_torch.convert_to_model_dir(tiny_official, model_dir)
    assert _tree(model_dir) == written
    from_torch.convert_to_model_dir(tiny_official, model_dir, overwrite=True)
    assert from_torch.is_converted_model_dir(model_dir) and sorted(os.listdir(tmp_path)) == [
        "checkpoint_0001.pth.tar", "from_torch"
    ]
    os.mkdir(os.path.join(model_dir, "logs"))  # trained in since: a run of its own now
    with pytest.raises(FileExistsError, match="not a model_dir written by moco_tf.convert"):
        from_torch.convert_to_model_dir(tiny_official, model_dir, overwrite=True)
