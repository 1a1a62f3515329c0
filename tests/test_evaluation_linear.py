"""Linear protocol on a tiny ResNet-18: only the classifier learns, BN statistics stay, the sanity
check fires, runs resume, and the CLI reports user mistakes in one line."""

from __future__ import annotations

import json
import types

import keras
import numpy as np
import pytest
import torch

from moco_tf import outputs
from moco_tf.data import pipelines, sources
from moco_tf.evaluation import linear
from moco_tf.models.resnet import resnet
from moco_tf.training.checkpoint_files import CheckpointError
from moco_tf.weights.pretrained import load_backbone
from tests.support.helpers import labelled_folder_datasets, randomize, run, run_local_workers, weights_snapshot
from tests.support.torch_reference import tf_encoder_state

BATCH = 16


def _torch_checkpoint(folder, width: int) -> str:
    """A torch checkpoint (the fastest PATH kind to load) of a ResNet-18 with random BN statistics."""
    backbone = resnet("resnet18", cifar_stem=True, width=width)
    randomize(backbone)
    state = tf_encoder_state(types.SimpleNamespace(backbone=backbone, head=types.SimpleNamespace(layers=[])))
    path = str(folder / f"r18w{width}.pth")
    torch.save({"state_dict": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}}, path)
    return path


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return _torch_checkpoint(tmp_path_factory.mktemp("pretrained"), 64)


@pytest.fixture(scope="module")
def digits():
    source = sources.make_source("digits")
    train = pipelines.labelled_dataset(source, "train", 32, BATCH, train_aug=True, shuffle=True, seed=0).take(2)
    val = pipelines.labelled_dataset(source, "test", 32, BATCH).take(1)
    return train, val


def test_only_the_classifier_learns(pretrained, digits):
    train, val = digits
    backbone, _ = load_backbone(pretrained)
    before = weights_snapshot(backbone)
    model, results = linear.train_linear(backbone, train, val, 10, steps_per_epoch=2, epochs=1)
    # The fresh classifier: N(0, 0.01) weights (now moved by two steps of lr 30), zero bias moved too.
    assert [v.path.split("/", 1)[1] for v in model.trainable_variables] == ["fc/kernel", "fc/bias"]
    assert np.abs(np.asarray(model.fc.bias)).max() > 0
    after = weights_snapshot(backbone)
    assert before.keys() == after.keys()
    for key in before:  # conv kernels, BN gamma/beta and BN moving statistics alike
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)
    assert any("moving_mean" in key for key in before)
    assert len(results) == 1 and results[0]["lr"] == pytest.approx(30.0)
    assert 0.0 <= results[0]["val_top1"] <= results[0]["val_top5"] <= 100.0
    assert linear.sanity_check(backbone, load_backbone(pretrained)[0], pretrained) == len(before)
    # Any change of the backbone, even a BN statistic, makes the check fail loudly.
    bn = backbone.model.get_layer("layer3.1.bn2")
    bn.moving_variance.assign(np.asarray(bn.moving_variance) * 1.001)
    with pytest.raises(linear.BackboneChangedError, match="layer3.1.bn2/moving_variance"):
        linear.sanity_check(backbone, load_backbone(pretrained)[0], pretrained)


def test_initialisation_and_schedule():
    model = linear.LinearClassifier(None, 1000)
    model(np.zeros((1, 2048), np.float32))
    kernel = np.asarray(model.fc.kernel)
    assert abs(kernel.std() - 0.01) < 5e-4 and abs(kernel.mean()) < 5e-4
    assert not np.asarray(model.fc.bias).any()
    optimizer = linear.make_optimizer(30.0, 0.9, 0.0, steps_per_epoch=10, epochs=100, milestones=(60, 80))
    rates = [float(optimizer._learning_rate(step)) for step in (0, 599, 600, 799, 800, 999)]
    np.testing.assert_allclose(rates, [30, 30, 3, 3, 0.3, 0.3], rtol=1e-6)
    assert optimizer.coupled_weight_decay == 0.0 and optimizer.momentum == 0.9


def test_schedule_follows_the_epochs_on_image_files(tmp_path):
    # Keras 3 ran the milestones early on such data (see labelled_folder_datasets).
    train, val = labelled_folder_datasets(tmp_path, BATCH)
    backbone = resnet("resnet18", cifar_stem=True, width=8)
    model, rows = linear.train_linear(backbone, train, val, 2, steps_per_epoch=2, epochs=3, lr=3.0,
                                      milestones=(2,), log=lambda _: None)  # fmt: skip
    assert int(model.optimizer.iterations.numpy()) == 6  # 24 images, batch 16: 2 steps an epoch
    assert [row["lr"] for row in rows] == pytest.approx([3.0, 3.0, 0.3])


def test_resume(pretrained, digits, tmp_path):
    train, val = digits
    backbone, _ = load_backbone(pretrained)
    features = linear.feature_dataset(backbone, train, BATCH, shuffle=False)[0]
    val_features = linear.feature_dataset(backbone, val, BATCH, shuffle=False)[0]
    model_dir = str(tmp_path / "lin")
    keras.utils.set_random_seed(1)
    first, _ = linear.train_linear(None, features, val_features, 10, 2, epochs=1, milestones=(1,), model_dir=model_dir)
    lines = []
    resumed, results = linear.train_linear(
        None, features, val_features, 10, 2, epochs=2, milestones=(1,), model_dir=model_dir, log=lines.append
    )
    assert lines[0].startswith("resuming from") and "epoch 1 of 2" in lines[0]
    assert int(resumed.optimizer.iterations) == 4
    assert [r["epoch"] for r in results] == [1, 2] and results[1]["lr"] == pytest.approx(3.0)
    # Resuming equals running both epochs in one go (same initial fc, same data order, momentum restored).
    keras.utils.set_random_seed(1)
    straight, _ = linear.train_linear(None, features, val_features, 10, 2, epochs=2, milestones=(1,))
    for a, b in zip(resumed.fc.get_weights(), straight.fc.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    done = []
    linear.train_linear(None, features, val_features, 10, 2, epochs=2, model_dir=model_dir, log=done.append)
    assert "epoch 2 of 2" in done[0] and len(done) == 1  # nothing left to train


def test_cli(pretrained, tmp_path):
    model_dir = tmp_path / "lin"
    args = ["-m", "moco_tf.lincls", "--flagfile=configs/cifar10_lincls.flags", f"--pretrained={pretrained}",
            "--dataset=digits", "--limit_train=32",
            "--limit_val=16", "--batch_size=16", "--epochs=1", f"--model_dir={model_dir}"]  # fmt: skip
    result = run(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    # From the flagfile: 30 per 256 images, used at batch 16 as 30 x 16 / 256.
    assert "lr 1.875 (30.0 per 256 images) x0.1 at epochs [60, 80]" in out
    assert "official protocol" in out and "epoch 1/1" in out and "final: val top-1" in out
    assert "sanity check passed: all 100 backbone variables" in out
    assert (model_dir / "ckpt-1.index").exists()
    assert json.loads((model_dir / "lincls_config.json").read_text())["sgd_momentum"] == 0.9
    bad = run(*args[:-1], f"--model_dir={model_dir}", "--lr=3", "--milestones=5")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == (
        f"error: model_dir {model_dir} holds another linear classifier run: --lr=30.0 (now 3.0), "
        "--milestones=60,80 (now 5); rerun with its values or use a new --model_dir"
    )


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--momentum=0.9", "error: --momentum is not a lincls flag: use --sgd_momentum"),
        ("--schedule=60,80", "error: --schedule is not a lincls flag: use --milestones=60,80"),
    ],
)
def test_flags_of_other_meaning_are_refused(flag, message):
    result = run("-m", "moco_tf.lincls", "--pretrained=nowhere", "--dataset=digits", flag)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(message), result.stderr


def test_helpfull_documents_every_flag():
    result = run("-m", "moco_tf.lincls", "--helpfull")
    for flag in ("pretrained", "dataset", "model_dir", "lr", "sgd_momentum", "milestones", "precompute_features",
                 "image_size"):  # fmt: skip
        assert f"--{flag}" in result.stdout
    assert "per 256 images" in result.stdout


def test_mirrored_training_matches_one_device(pretrained, digits):
    """2 replicas (2 logical CPUs), the backbone rebuilt in the strategy's scope: each replica
    embeds and classifies half of every batch; the classifier after 3 steps, its loss and its
    top-1 equal the one-device run's up to float rounding (the gradient is summed in another order)."""
    from moco_tf.evaluation.frozen import replicate
    from moco_tf.training.distribute import mirrored

    _, val = digits
    data = val.repeat(3)  # 3 batches of 16, no augmentation: the same inputs for both runs
    backbone, info = load_backbone(pretrained)
    keras.utils.set_random_seed(2)
    one, one_rows = linear.train_linear(backbone, data, val, 10, steps_per_epoch=3, epochs=1, lr=3.0, log=print)
    strategy = mirrored()
    replicated = replicate(backbone, lambda: resnet("resnet18", cifar_stem=True), strategy)
    keras.utils.set_random_seed(2)  # the same initial classifier
    two, two_rows = linear.train_linear(replicated, data, val, 10, steps_per_epoch=3, epochs=1, lr=3.0,
                                        strategy=strategy, log=print)  # fmt: skip
    assert two.distribute_strategy is strategy and int(two.optimizer.iterations.numpy()) == 3
    for a, b in zip(one.fc.get_weights(), two.fc.get_weights(), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    assert two_rows[0]["loss"] == pytest.approx(one_rows[0]["loss"], rel=1e-4)
    assert two_rows[0]["val_top1"] == one_rows[0]["val_top1"]
    assert linear.evaluate(two, val) == pytest.approx(linear.evaluate(one, val))


def test_cli_multi_worker_matches_one_device(tmp_path):
    """Two local workers (TF_CONFIG on 127.0.0.1, one replica each) train one classifier on the
    precomputed features, each on half of every batch: both print the one-device run's loss (to
    rounding: gradients summed in another order) and final top-1/top-5; only the chief writes."""
    pretrained = _torch_checkpoint(tmp_path, 8)  # narrow: three processes extract features
    args = ["-m", "moco_tf.lincls", f"--pretrained={pretrained}", "--dataset=digits", "--limit_train=32",
            "--limit_val=16", "--batch_size=16", "--epochs=1", "--lr=0.01", "--precompute_features", "--seed=3",
            "--mixed_precision=none"]  # fmt: skip

    def loss_and_final(out: str) -> tuple[float, str]:
        epoch = next(line for line in out.splitlines() if line.startswith("epoch 1/1"))
        return float(epoch.split("loss ")[1].split()[0]), next(x for x in out.splitlines() if x.startswith("final:"))

    one = run(*args, f"--model_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    loss, final = loss_and_final(one.stdout)
    results = run_local_workers([
        [*args, f"--model_dir={tmp_path / 'two'}", "--strategy=multi_worker", "--peer_timeout=60"] for _ in range(2)
    ])  # fmt: skip
    for returncode, out, err in results:
        assert returncode == 0, err[-3000:]
        worker_loss, worker_final = loss_and_final(out)
        assert worker_loss == pytest.approx(loss, rel=1e-3) and worker_final == final, out
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def _features(n=48, dim=8, seed=0):
    rng = np.random.RandomState(seed)
    return rng.randn(n, dim).astype(np.float32), rng.randint(0, 3, n)


def test_stopped_and_resumed_with_a_seed_ends_as_uninterrupted(tmp_path):
    """Each epoch's pass is batched_features(..., epoch=e) (the CLI's --precompute_features; the
    official protocol's images: labelled_dataset(..., epoch=e), tests/test_evaluation_finetune.py)."""
    import functools

    features, labels = _features()
    passes = functools.partial(linear.batched_features, features, labels, 16, True, 5)
    orders = [[y.tolist() for _, y in passes(e).as_numpy_iterator()] for e in (0, 1)]
    assert orders[0] != orders[1]  # a new order every epoch
    val = linear.batched_features(features[:16], labels[:16], 16, False)

    def train(model_dir):
        keras.utils.set_random_seed(5)
        model, rows = linear.train_linear(None, passes, val, 3, 3, epochs=3, lr=3.0, milestones=(2,),
                                          model_dir=str(model_dir), log=lambda _: None)  # fmt: skip
        return model.fc.get_weights(), rows

    straight, rows = train(tmp_path / "run")
    for name in ("ckpt-3.index", "ckpt-3.data-00000-of-00001", "ckpt-2.index", "ckpt-2.data-00000-of-00001"):
        (tmp_path / "run" / name).unlink()  # as if stopped after epoch 1
    (tmp_path / "run" / "checkpoint").write_text('model_checkpoint_path: "ckpt-1"\n')
    resumed, resumed_rows = train(tmp_path / "run")
    difference = max(float(np.abs(a - b).max()) for a, b in zip(straight, resumed, strict=True))
    print(f"lincls stopped after epoch 1 and resumed vs uninterrupted: max abs difference {difference:.3g}")
    assert difference <= 1e-6 and [r["loss"] for r in resumed_rows] == [r["loss"] for r in rows]


def test_broken_newest_checkpoint_is_named_moved_aside_only_when_asked(tmp_path):
    features, labels = _features()
    train_ds = linear.batched_features(features, labels, 16, True, 1)
    run_dir = tmp_path / "run"

    def train(repair):
        lines = []
        linear.train_linear(None, train_ds, train_ds, 3, 3, epochs=2, model_dir=str(run_dir), log=lines.append,
                            repair_broken=repair)  # fmt: skip
        return lines

    def cut_short():  # what a kill in the middle of writing the data file leaves
        data = run_dir / "ckpt-2.data-00000-of-00001"
        data.write_bytes(data.read_bytes()[:20])

    train(False)
    cut_short()
    kept = train(False)  # a folder not proven this command's own: named and skipped, nothing moved
    assert kept[0].startswith(f"checkpoint {run_dir}/ckpt-2 is unreadable (")
    assert kept[0].endswith("; using the previous one")
    assert "epoch 1 of 2" in kept[1] and not (run_dir / "broken").exists()
    cut_short()  # (the resumed run wrote its own ckpt-2)
    moved = train(True)
    assert moved[0].startswith(f"checkpoint {run_dir}/ckpt-2 is unreadable") and "epoch 1 of 2" in moved[1]
    assert sorted(p.name for p in (run_dir / "broken").iterdir()) == ["ckpt-2.data-00000-of-00001", "ckpt-2.index"]
    for name in ("ckpt-1", "ckpt-2"):
        (run_dir / f"{name}.data-00000-of-00001").write_bytes(b"")
    with pytest.raises(CheckpointError, match="holds checkpoint files but none is readable") as error:
        train(True)
    assert "\n" not in str(error.value)
    (run_dir / linear.RESULTS_FILE).write_bytes(b"\xff\xfe garbage")
    with pytest.raises(outputs.OutputError, match=f"{run_dir}/lincls_results.json is not a moco_tf") as error:
        linear.read_results_file(str(run_dir / linear.RESULTS_FILE))
    assert "\n" not in str(error.value)


def test_only_a_folder_holding_the_commands_own_config_is_its_model_dir(tmp_path):
    from moco_tf.cli.evaluation import is_own_model_dir
    from moco_tf.training.evaluation_config import LinearConfig

    path = tmp_path / linear.CONFIG_FILE
    assert not is_own_model_dir(str(tmp_path), linear.CONFIG_FILE)  # nothing there yet
    for foreign in (b'{"lr": 30}', b"\xff\xfe", b"[1, 2]", b'{"format_version": "2"}'):  # a user's, garbled, ...
        path.write_bytes(foreign)
        assert not is_own_model_dir(str(tmp_path), linear.CONFIG_FILE), foreign
    path.write_text(LinearConfig(pretrained="/x", dataset="digits").to_json())
    assert is_own_model_dir(str(tmp_path), linear.CONFIG_FILE)
    assert not is_own_model_dir(str(tmp_path), "finetune_config.json")
