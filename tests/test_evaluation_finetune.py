"""Fine-tuning: the labelled subset, the recipe's optimizer and schedule, every weight and BN
statistic training, resume, the recipe check, and a run from each kind of --pretrained PATH.
A ResNet-18 of width 8 on the 32 px digits keeps each test to a few steps."""

from __future__ import annotations

import dataclasses
import math
import os
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from moco_tf.data import pipelines, sources, subsets
from moco_tf.evaluation import finetune
from moco_tf.models.backbones import BackboneSpec
from moco_tf.outputs import OutputError
from moco_tf.training.config import RunMismatchError
from moco_tf.training.evaluation_config import FinetuneConfig
from tests.support.helpers import image_folder, labelled_folder_datasets, randomize, run

SPEC = BackboneSpec("resnet18", 8, True)
BATCH = 16


def test_subset_is_class_balanced_fixed_by_its_seed_and_disjoint_from_eval(tmp_path):
    image_folder(tmp_path, {"a": 40, "b": 20, "c": 10}, "train")
    image_folder(tmp_path, {"a": 3, "b": 3, "c": 3}, "test")
    source = sources.make_source("folder", str(tmp_path))
    subset = subsets.label_subset(source, 0.1, seed=0)
    paths, labels = subset.splits["train"]
    # round(0.1 x 40, 20, 10) = 4, 2, 1 per class, whatever the class sizes.
    assert np.bincount(labels).tolist() == [4, 2, 1]
    assert all(os.path.basename(os.path.dirname(p)) == "abc"[y] for p, y in zip(paths, labels, strict=True))
    assert set(paths) <= set(source.splits["train"][0])
    assert not set(paths) & set(source.splits["test"][0]) and subset.splits["test"] is source.splits["test"]
    assert subset.num_examples("train") == 7 and subset.num_examples("test") == 9
    # The same seed gives the same subset; another seed another one; a larger fraction contains it.
    np.testing.assert_array_equal(subsets.label_subset(source, 0.1, seed=0).splits["train"][0], paths)
    assert set(subsets.label_subset(source, 0.1, seed=1).splits["train"][0]) != set(paths)
    assert set(paths) <= set(subsets.label_subset(source, 0.5, seed=0).splits["train"][0])
    assert subsets.label_subset(source, 1.0, seed=0) is source
    with pytest.raises(sources.DataError, match="label_fraction must be in"):
        subsets.label_subset(source, 0.0, seed=0)
    # A TFDS source keeps the same examples through a filter on its stored order (tested here on
    # the folder's files: the filter does not depend on the kind of source).
    fields = {f.name: getattr(source, f.name) for f in dataclasses.fields(sources.Source)}
    indices = subsets.class_balanced_indices(source.splits["train"][1], 0.1, seed=0)
    filtered = subsets._TfdsSubset(**fields, indices=indices)
    assert filtered.num_examples("train") == 7
    read = [label for _, label in filtered.examples("train").as_numpy_iterator()]
    assert read == np.asarray(source.splits["train"][1])[indices].tolist() == sorted(labels.tolist())


def test_nesterov_sgd_matches_torch():
    torch = pytest.importorskip("torch")
    w0 = np.random.RandomState(0).randn(5).astype(np.float32)
    grads = np.random.RandomState(1).randn(4, 5).astype(np.float32)
    ours = tf.Variable(w0)
    optimizer = finetune.NesterovSGD(0.1, momentum=0.9, weight_decay=1e-3)
    theirs = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    reference = torch.optim.SGD([theirs], lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)
    for g in grads:
        optimizer.apply_gradients([(tf.constant(g), ours)])
        theirs.grad = torch.from_numpy(g.copy())
        reference.step()
    np.testing.assert_allclose(ours.numpy(), theirs.detach().numpy(), rtol=1e-6, atol=1e-7)


def test_the_recipe_and_its_schedule():
    # SimCLR v1 B.5: 60 epochs at 1%, 30 at 10%, lr 0.05 per 256 images, Nesterov.
    assert (finetune.default_epochs(0.01), finetune.default_epochs(0.1), finetune.default_epochs(0.5)) == (60, 30, None)
    assert FinetuneConfig().lr == finetune.BASE_LR == 0.05 and FinetuneConfig().nesterov
    optimizer = finetune.make_optimizer(0.8, 0.9, True, 0.0, steps_per_epoch=3, epochs=4)
    assert isinstance(optimizer, finetune.NesterovSGD)
    assert float(optimizer.learning_rate) == pytest.approx(0.8)
    schedule = finetune.make_schedule(0.8, steps_per_epoch=3, epochs=4)
    rates = [float(schedule(step)) for step in range(12)]
    expected = [0.8 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
    np.testing.assert_allclose(rates, np.repeat(expected, 3), rtol=1e-6)  # cosine, set per epoch
    assert rates[0] == pytest.approx(0.8)  # no warm-up


@pytest.fixture(scope="module")
def digits():
    source = sources.make_source("digits")
    small = subsets.label_subset(source, 0.02, seed=0)  # 2% of 1438: 30 images, 3 a class
    train = pipelines.labelled_dataset(small, "train", 32, BATCH, train_aug=True, shuffle=True, seed=0)
    val = pipelines.labelled_dataset(source, "test", 32, BATCH, subset=32)
    return small, train, val


def test_every_weight_and_bn_statistic_trains_and_evaluation_uses_the_moving_ones(digits, tmp_path):
    small, train, val = digits
    assert small.num_examples("train") == 30
    pretrained = SPEC.build()
    randomize(pretrained)
    model = finetune.build_classifier(SPEC.build, 10, pretrained.get_weights())
    for ours, theirs in zip(model.backbone.weights, pretrained.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    before = {w.path: np.array(w) for w in model.weights}
    results = finetune.finetune(model, train, val, steps_per_epoch=2, epochs=1, lr=0.05, model_dir=str(tmp_path))
    after = {w.path: np.array(w) for w in model.weights}
    unchanged = [path for path in before if np.array_equal(before[path], after[path])]
    assert unchanged == []  # conv kernels, BN gamma / beta / moving statistics, the head
    assert any("moving_mean" in path for path in before)
    assert [r["epoch"] for r in results] == [1] and results[0]["lr"] == pytest.approx(0.05)
    assert 0.0 <= results[0]["val_top1"] <= results[0]["val_top5"] <= 100.0
    # Inference mode: an image's logits do not depend on the batch it is in; training mode's do.
    x = next(iter(val))[0][:8]
    alone = model(x[:1], training=False).numpy()
    np.testing.assert_allclose(model(x, training=False).numpy()[:1], alone, rtol=1e-4, atol=1e-5)
    assert np.abs(model(x, training=True).numpy()[:1] - alone).max() > 1e-3
    assert os.path.isdir(tmp_path / "logs") and os.path.exists(tmp_path / finetune.RESULTS_FILE)


def test_schedule_follows_the_epochs_on_image_files(tmp_path):
    # Keras 3 ran the schedule ahead on such data (see labelled_folder_datasets).
    train, val = labelled_folder_datasets(tmp_path, BATCH)
    model = finetune.build_classifier(SPEC.build, 2, sample_shape=(16, 16, 3))
    results = finetune.finetune(model, train, val, steps_per_epoch=2, epochs=3, lr=0.05, eval_every=0)
    assert int(model.optimizer.iterations.numpy()) == 6  # 24 images, batch 16: 2 steps an epoch
    cosine = [0.05 * 0.5 * (1 + math.cos(math.pi * e / 3)) for e in range(3)]  # each epoch's first step
    np.testing.assert_allclose([r["lr"] for r in results], cosine, rtol=1e-6)


def test_resume_goes_on_from_the_last_epoch(digits, tmp_path):
    _, train, val = digits
    first = finetune.build_classifier(SPEC.build, 10)
    finetune.finetune(first, train, val, steps_per_epoch=2, epochs=2, lr=0.05, model_dir=str(tmp_path), eval_every=2)
    saved = [np.array(w) for w in first.weights]
    # As if killed during epoch 2: epoch 1's checkpoint is the newest one recorded.
    for name in ("ckpt-2.index", "ckpt-2.data-00000-of-00001"):
        os.remove(tmp_path / "checkpoints" / name)
    (tmp_path / "checkpoints" / "checkpoint").write_text(
        'model_checkpoint_path: "ckpt-1"\nall_model_checkpoint_paths: "ckpt-1"\n'
    )
    lines = []
    second = finetune.build_classifier(SPEC.build, 10)
    results = finetune.finetune(
        second, train, val, steps_per_epoch=2, epochs=2, lr=0.05, model_dir=str(tmp_path), eval_every=2,
        log=lines.append,
    )  # fmt: skip
    assert lines[0].startswith("resuming from") and "epoch 1 of 2 done" in lines[0]
    assert [r["epoch"] for r in results] == [1, 2] and "val_top1" not in results[0] and "val_top1" in results[1]
    # Epoch 2 ran again from epoch 1's state: the same weights as the first run's epoch 2 would
    # need the same batches; what must hold is that it moved on from the checkpoint.
    assert any(not np.array_equal(a, np.array(b)) for a, b in zip(saved, second.weights, strict=True))
    third = finetune.build_classifier(SPEC.build, 10)  # all epochs done: restores, trains nothing
    finetune.finetune(third, train, val, steps_per_epoch=2, epochs=2, lr=0.05, model_dir=str(tmp_path))
    for a, b in zip(second.weights, third.weights, strict=True):
        np.testing.assert_array_equal(np.array(a), np.array(b))


def _config(tmp_path, **changes) -> FinetuneConfig:
    values = dict(
        dataset="digits", label_fraction=0.01, batch_size=BATCH, epochs=1, seed=0, limit_val=16,
        model_dir=str(tmp_path / "run"),
    )  # fmt: skip
    return FinetuneConfig(**{**values, **changes})


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """One backbone saved as each kind of PATH: model_dir, TF-Hub export, PyTorch checkpoint."""
    torch = pytest.importorskip("torch")
    from moco_tf.interop import hub
    from moco_tf.models.moco import MoCo
    from moco_tf.training.checkpoint import write_model_dir
    from tests.support.torch_reference import tf_encoder_state

    root = tmp_path_factory.mktemp("pretrained")
    model = MoCo(arch="resnet18", width=8, cifar_stem=True, dim=16, queue_size=16, image_size=32)
    randomize(model.backbone_q)
    backbone = model.backbone_q
    paths = {"model_dir": write_model_dir(str(root / "run"), model, {"dataset": "digits", "image_size": 32})}
    paths["export"] = hub.export_backbone(backbone, str(root / "export"), {**SPEC.to_dict(), "image_size": 32})
    state = tf_encoder_state(types.SimpleNamespace(backbone=backbone, head=types.SimpleNamespace(layers=[])))
    paths["torch"] = str(root / "r18.pth")
    torch.save({"state_dict": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}}, paths["torch"])
    return paths, [np.array(w) for w in backbone.weights]


# model_dir runs with -m slow (it loads through the same `load_backbone` as kNN and lincls, tested
# in tests/test_weights_pretrained.py); the export (which also checks the recipe refusal) and the
# PyTorch checkpoint in CI.
@pytest.mark.parametrize("kind", [pytest.param("model_dir", marks=pytest.mark.slow), "export", "torch"])
def test_finetune_from_each_kind_of_path(weights, kind, tmp_path, monkeypatch):
    from moco_tf import finetune as command_line

    paths, expected = weights
    built = []
    monkeypatch.setattr(finetune, "build_classifier", _recording(finetune.build_classifier, built))
    config = _config(tmp_path, pretrained=paths[kind])
    final = command_line.run_finetune(config, tf.distribute.get_strategy())
    assert 0.0 <= final["top1"] <= final["top5"] <= 100.0
    # Training started from PATH's weights (BN statistics included).
    (start,) = built
    assert len(start) == len(expected)
    for ours, theirs in zip(start, expected, strict=True):
        np.testing.assert_array_equal(ours, theirs)
    recorded = FinetuneConfig.from_json((tmp_path / "run" / finetune.CONFIG_FILE).read_text())
    assert recorded.pretrained == os.path.abspath(paths[kind]) and recorded.epochs == 1
    assert (recorded.arch, recorded.width, recorded.cifar_stem) == ("resnet18", 8, True)
    if kind == "export":  # a changed recipe in the same model_dir is refused, naming the flag
        with pytest.raises(RunMismatchError, match=r"--lr=0.05 \(now 0.1\)"):
            command_line.run_finetune(dataclasses.replace(config, lr=0.1), tf.distribute.get_strategy())


def _recording(build, built):
    def wrapped(build_backbone, num_classes, weights=None, strategy=None, sample_shape=(32, 32, 3)):
        built.append(None if weights is None else [np.array(w) for w in weights])
        return build(build_backbone, num_classes, weights, strategy, sample_shape)

    return wrapped


@pytest.mark.slow  # four fresh interpreters
def test_command_line_random_init_export_and_mistakes(tmp_path):
    result = run(
        "-m", "moco_tf.finetune", "--random_init", "--arch=resnet18", "--width=8", "--cifar_stem",
        "--dataset=digits", "--label_fraction=0.01", "--epochs=1", f"--batch_size={BATCH}", "--limit_val=16",
        "--seed=0", f"--model_dir={tmp_path / 'run'}", f"--export_dir={tmp_path / 'export'}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "random init" in result.stdout and "final: test top-1" in result.stdout, result.stdout
    from moco_tf.interop import hub

    config = hub.read_config(str(tmp_path / "export"))
    assert config["num_classes"] == 10 and "logits" in config["signatures"]["serving_default"]
    assert config["finetune"]["label_fraction"] == 0.01
    loaded = tf.saved_model.load(str(tmp_path / "export"))
    logits = loaded.signatures["serving_default"](images=tf.zeros([2, 32, 32, 3]))["logits"]
    assert tuple(logits.shape) == (2, 10)
    from moco_tf.weights.pretrained import load_backbone

    assert load_backbone(str(tmp_path / "export"))[1]["kind"] == "export"  # usable as --pretrained again
    for argv, message in (
        (["--pretrained=x", "--random_init"], "--random_init and --pretrained exclude each other"),
        (["--random_init", "--label_fraction=0.5"], "give --epochs for 0.5"),
        (["--pretrained=x", "--momentum=0.9"], "--momentum is not a finetune flag"),
    ):
        result = run("-m", "moco_tf.finetune", "--dataset=digits", *argv)
        assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error:"), result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr


def _drop_newest_checkpoint(ckpt_dir) -> None:
    """As if killed during epoch 2: epoch 1's checkpoint is the newest one on disk and recorded."""
    for name in ("ckpt-2.index", "ckpt-2.data-00000-of-00001"):
        os.remove(ckpt_dir / name)
    (ckpt_dir / "checkpoint").write_text('model_checkpoint_path: "ckpt-1"\nall_model_checkpoint_paths: "ckpt-1"\n')


def test_stopped_and_resumed_with_a_seed_ends_as_uninterrupted(tmp_path):
    """Each epoch's pass is labelled_dataset(..., epoch=e): a resume trains on the very passes an
    uninterrupted run does (before, every epoch of a folder repeated the first one's order and
    crops, and a resumed run of digits replayed the first epoch's order)."""
    source = sources.make_source("digits")

    def passes(epoch):
        return pipelines.labelled_dataset(source, "train", 32, BATCH, train_aug=True, shuffle=True, seed=7,
                                          subset=32, epoch=epoch)  # fmt: skip

    first, second = ([y.numpy().tolist() for _, y in passes(e)] for e in (0, 1))
    assert first != second  # a new order every epoch
    val = pipelines.labelled_dataset(source, "test", 32, BATCH, subset=16)

    def run_finetune(model_dir):
        keras.utils.set_random_seed(7)
        model = finetune.build_classifier(SPEC.build, 10)
        finetune.finetune(model, passes, val, steps_per_epoch=2, epochs=2, lr=0.1, model_dir=str(model_dir),
                          eval_every=0, log=lambda _: None, tensorboard=False)  # fmt: skip
        return model

    straight = [np.array(w) for w in run_finetune(tmp_path / "run").weights]
    _drop_newest_checkpoint(tmp_path / "run" / "checkpoints")
    resumed = [np.array(w) for w in run_finetune(tmp_path / "run").weights]
    difference = max(float(np.abs(a - b).max()) for a, b in zip(straight, resumed, strict=True))
    print(f"finetune stopped after epoch 1 and resumed vs uninterrupted: max abs difference {difference:.3g}")
    assert difference <= 1e-6


def test_a_garbled_results_file_is_one_line_naming_it(tmp_path):
    # (a broken newest checkpoint: tests/test_evaluation_linear.py, through the same `linear.resume`)
    (tmp_path / finetune.RESULTS_FILE).write_text('[{"epoch": 1,')
    with pytest.raises(OutputError, match=f"{tmp_path}/finetune_results.json is not a moco_tf") as error:
        finetune.read_results(str(tmp_path))
    assert "\n" not in str(error.value)
    (tmp_path / finetune.RESULTS_FILE).write_text('{"epoch": 1}')
    with pytest.raises(OutputError, match=f"{tmp_path}/finetune_results.json is not a moco_tf"):
        finetune.read_results(str(tmp_path))
