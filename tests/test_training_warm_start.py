"""--init_from (a new run starting from existing weights) and --allow_more_epochs (extending a
finished run): what is copied, what is refused, what config.json records, the lr after extension."""

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

import moco_tf
from moco_tf.evaluation import curves
from moco_tf.interop import hub
from moco_tf.models.backbones import BackboneSpec
from moco_tf.training import checkpoint, warm_start
from moco_tf.training.config import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    RunMismatchError,
    RuntimeConfig,
)
from moco_tf.training.schedules import EpochSchedule, scaled_lr
from tests.support import torch_reference


def _tiny(model_dir: str, width: int = 8, epochs: int = 2, max_steps: int | None = None, **runtime) -> PretrainConfig:
    return PretrainConfig(
        model=ModelConfig(BackboneSpec("resnet18", width=width, cifar_stem=True), dim=16, queue_size=32,
                          moco_momentum=0.99, temperature=0.2, mlp=True, bn_groups=2),
        data=DataConfig(dataset="digits", aug="v2"),
        optim=OptimConfig(epochs=epochs, batch_size=16, lr=0.06, schedule="cosine"),
        runtime=RuntimeConfig(seed=1, model_dir=model_dir, steps_per_epoch=1, max_steps=max_steps, knn_every=0,
                              **runtime),
    )  # fmt: skip


def _pretrain(config: PretrainConfig):
    return moco_tf.pretrain(config, progress="none")


def _values(layer) -> list[np.ndarray]:
    return [np.array(w) for w in layer.weights]


def _assert_same(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    """A moco_tf model_dir after 2 steps (weights no longer the fresh model's)."""
    model_dir = str(tmp_path_factory.mktemp("source") / "run")
    _pretrain(_tiny(model_dir, epochs=2))
    return model_dir


@pytest.mark.slow  # two short runs besides the source's
def test_model_dir_gives_backbone_and_head_to_both_encoders_then_resume_ignores_path(source_dir, tmp_path):
    source, _ = checkpoint.restore_model(source_dir)
    model_dir = str(tmp_path / "run")
    config = _tiny(model_dir, init_from=source_dir)
    model = checkpoint.build_model(config)
    fresh = _values(model.encoder_q.backbone)
    recorded = warm_start.initialise(model, config)
    for encoder in (model.encoder_q, model.encoder_k):
        _assert_same(_values(encoder.backbone), _values(source.encoder_q.backbone))
        _assert_same(_values(encoder.head), _values(source.encoder_q.head))
    assert not np.array_equal(fresh[0], _values(source.encoder_q.backbone)[0])  # a real copy happened
    assert all(not w.trainable for w in model.encoder_k.weights)  # the key encoder stays frozen
    assert recorded.source.startswith("initialised from resnet18 width 8 from model_dir")

    # Through pretrain(): recorded in config.json; the optimizer starts at step 0, the queue fresh.
    result = _pretrain(_tiny(model_dir, max_steps=1, init_from=os.path.relpath(source_dir)))
    saved = json.load(open(os.path.join(model_dir, "config.json")))
    assert saved["runtime"]["init_from"] == source_dir and "model_dir " + source_dir in saved["source"]
    assert int(result.model.optimizer.iterations.numpy()) == 1
    after_one_step = _values(result.model.encoder_q.backbone)
    # A resume reads its checkpoint, never PATH again: the source may even be gone.
    moved = str(tmp_path / "moved")
    shutil.copytree(source_dir, moved)
    shutil.rmtree(os.path.join(moved, "checkpoints"))
    resumed = _pretrain(_tiny(model_dir, max_steps=1, init_from=moved))  # nothing left to train
    assert int(resumed.model.optimizer.iterations.numpy()) == 1
    _assert_same(_values(resumed.model.encoder_q.backbone), after_one_step)


def test_export_and_torch_checkpoint(source_dir, tmp_path):
    source, _ = checkpoint.restore_model(source_dir)
    export = hub.export_moco(source, str(tmp_path / "export"), {"dataset": "digits"})
    config = _tiny(str(tmp_path / "a"), init_from=export)
    model = checkpoint.build_model(config)
    warm_start.initialise(model, config)
    for encoder in (model.encoder_q, model.encoder_k):
        _assert_same(_values(encoder.backbone), _values(source.encoder_q.backbone))

    torch.manual_seed(0)
    net = torch_reference.ResNet(18, fc=torch_reference.moco_head(64, 16, mlp=True), cifar_stem=True, width=8)
    state = {f"module.encoder_q.{k}": v for k, v in net.state_dict().items()}
    path = str(tmp_path / "checkpoint_0199.pth.tar")
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": state}, path)
    config = _tiny(str(tmp_path / "b"), init_from=path)
    model = checkpoint.build_model(config)
    warm_start.initialise(model, config)
    images = np.random.RandomState(0).rand(2, 32, 32, 3).astype(np.float32)
    net.fc = torch.nn.Identity()
    with torch.no_grad():
        expected = net.eval()(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    for backbone in (model.encoder_q.backbone, model.encoder_k.backbone):
        np.testing.assert_allclose(backbone(images, training=False).numpy(), expected, rtol=1e-4, atol=1e-4)


def test_other_backbone_is_refused_in_one_line(source_dir, tmp_path):
    config = _tiny(str(tmp_path / "run"), width=16, init_from=source_dir)
    with pytest.raises(warm_start.InitFromError) as error:
        _pretrain(config)
    message = str(error.value)
    assert "\n" not in message
    assert "resnet18 width 8 (cifar_stem=True) backbone, this run trains a resnet18 width 16" in message
    assert not os.path.exists(os.path.join(tmp_path, "run", "checkpoints", "ckpt-1.index"))


@pytest.mark.slow  # three short runs: ~20 s of CPU
def test_extending_a_finished_run_recomputes_the_schedule(tmp_path):
    model_dir = str(tmp_path / "run")
    _pretrain(_tiny(model_dir, epochs=2))  # finished: 2 epochs of 1 step
    with pytest.raises(RunMismatchError, match=r"--epochs=2 \(now 5\)"):
        _pretrain(_tiny(model_dir, epochs=5))
    with pytest.raises(RunMismatchError, match=r"--epochs=2 \(now 1\)"):  # never fewer
        _pretrain(_tiny(model_dir, epochs=1, allow_more_epochs=True))

    result = _pretrain(_tiny(model_dir, epochs=5, max_steps=3, allow_more_epochs=True))
    optimizer = result.model.optimizer
    assert int(optimizer.iterations.numpy()) == 3  # continued from step 2, not restarted
    base = scaled_lr(0.06, 16)
    # The step just taken (epoch 2 of a 5-epoch cosine) jumped above the 2-epoch run's last rate
    # (epoch 1 of 2); the optimizer's rate for the next step is epoch 3's of the 5-epoch cosine.
    first = base * 0.5 * (1 + math.cos(math.pi * 2 / 5))
    np.testing.assert_allclose(result.history["lr"][-1], first, rtol=1e-6)
    assert first > 1.3 * base * 0.5 * (1 + math.cos(math.pi * 1 / 2))
    np.testing.assert_allclose(
        float(optimizer.learning_rate.numpy()), base * 0.5 * (1 + math.cos(math.pi * 3 / 5)), rtol=1e-6
    )
    # The lr as TensorBoard holds it (epochs of 1 step, --log_every 50: written all the same).
    lr = curves.curves(model_dir, steps_per_epoch_=1)["train/epoch_lr"]
    np.testing.assert_array_equal(lr[0], [1, 2, 3])
    np.testing.assert_allclose(lr[1], [base, base * 0.5, first], rtol=1e-6)
    saved = checkpoint.read_config(model_dir)
    assert saved.optim.epochs == 5 and saved.extensions == ({"from_epochs": 2, "to_epochs": 5, "at_step": 2},)

    # Resuming the extended run needs no flag; extending it again adds a second record.
    assert warm_start.comparable(saved, _tiny(model_dir, epochs=5)) == saved
    again = warm_start.extended_config(saved, _tiny(model_dir, epochs=8, allow_more_epochs=True), step=5)
    assert again.extensions[1] == {"from_epochs": 5, "to_epochs": 8, "at_step": 5}
    assert len(again.extensions) == 2 and again.optim.epochs == 8


def test_extension_rules_without_training(tmp_path):
    saved = _tiny(str(tmp_path), epochs=200)
    longer = _tiny(str(tmp_path), epochs=800, allow_more_epochs=True)
    assert warm_start.extension(saved, longer) == (200, 800)
    assert warm_start.extension(saved, _tiny(str(tmp_path), epochs=800)) is None  # no flag: a recipe change
    assert warm_start.comparable(saved, longer).recipe_settings() == longer.recipe_settings()
    other = PretrainConfig(model=longer.model, data=longer.data, runtime=longer.runtime,
                           optim=OptimConfig(epochs=800, batch_size=16, lr=0.1, schedule="cosine"))
    assert warm_start.comparable(saved, other).recipe_settings() != other.recipe_settings()  # lr is still compared
    record = warm_start.extended_config(saved, longer, step=200)
    assert record.extensions == ({"from_epochs": 200, "to_epochs": 800, "at_step": 200},)
    assert PretrainConfig.from_json(record.to_json()).extensions == record.extensions
    # The 800-epoch cosine at epoch 200 (steps_per_epoch 1): 0.85 x lr, where the 200-epoch one ended.
    rate = EpochSchedule(scaled_lr(0.06, 16), 1, 800, "cosine")(200)
    np.testing.assert_allclose(float(rate), scaled_lr(0.06, 16) * 0.5 * (1 + math.cos(math.pi / 4)), rtol=1e-6)
