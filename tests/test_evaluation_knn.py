"""Weighted kNN: hand-computed votes, ties, blocks, the official demo's code, the monitor (one
traced function per backbone, no retracing warning), and the `moco_tf.knn` command line."""

from __future__ import annotations

import gc
import glob
import logging
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
import torch

from moco_tf.data import pipelines, sources
from moco_tf.evaluation import frozen, knn
from moco_tf.interop import hub
from moco_tf.models.resnet import resnet
from tests.support.helpers import randomize, run, run_local_workers

S = 1.0 / math.sqrt(2.0)
# A memory bank on the unit circle: angle 0 (class 0), 90 deg (class 1), 45 deg (class 1), 180 deg (class 2).
BANK = np.array([[1, 0], [0, 1], [S, S], [-1, 0]], np.float32)
BANK_LABELS = np.array([0, 1, 1, 2])
QUERY = np.array([[1, 0]], np.float32)  # similarities 1, 0, 0.707, -1


def test_hand_computed_votes():
    # k=2, t=0.1: neighbours 0 (sim 1) and 2 (sim 0.707); class 0 gets e^10, class 1 e^7.07.
    scores = knn.knn_scores(BANK, BANK_LABELS, QUERY, k=2, t=0.1, num_classes=3)
    np.testing.assert_allclose(scores, [[math.exp(10), math.exp(S / 0.1), 0]], rtol=1e-5)
    assert knn.knn_predict(BANK, BANK_LABELS, QUERY, k=2, t=0.1).tolist() == [0]
    # k=3, t=1: two class-1 neighbours (e^0.707 + e^0 = 3.03) outvote one class-0 (e^1 = 2.72).
    scores = knn.knn_scores(BANK, BANK_LABELS, QUERY, k=3, t=1.0, num_classes=3)
    np.testing.assert_allclose(scores, [[math.e, math.exp(S) + 1.0, 0]], rtol=1e-5)
    assert knn.knn_predict(BANK, BANK_LABELS, QUERY, k=3, t=1.0).tolist() == [1]
    # ...and with a sharp t the close one wins again.
    assert knn.knn_predict(BANK, BANK_LABELS, QUERY, k=3, t=0.1).tolist() == [0]


def test_features_are_normalised_and_k_is_capped():
    scaled = knn.knn_scores(BANK * [[3.0], [0.5], [7.0], [2.0]], BANK_LABELS, QUERY * 5.0, k=3, t=1.0, num_classes=3)
    np.testing.assert_allclose(scaled, [[math.e, math.exp(S) + 1.0, 0]], rtol=1e-5)
    everything = knn.knn_scores(BANK, BANK_LABELS, QUERY, k=200, t=1.0, num_classes=4)
    np.testing.assert_allclose(everything, [[math.e, math.exp(S) + 1.0, math.exp(-1), 0]], rtol=1e-5)


def test_ties():
    # Query at 45 deg: bank entries 0 (class 1) and 1 (class 0) are equally similar.
    bank, labels, query = np.array([[1, 0], [0, 1]], np.float32), np.array([1, 0]), np.array([[S, S]], np.float32)
    # k=1: equal similarities -> the lower bank index (entry 0, class 1).
    assert knn.knn_predict(bank, labels, query, k=1).tolist() == [1]
    # k=2: equal class scores -> the lower class index.
    assert knn.knn_predict(bank, labels, query, k=2).tolist() == [0]
    assert knn.accuracy(knn.knn_scores(bank, labels, query, k=2), [1], topk=(1, 2)) == {"top1": 0.0, "top2": 100.0}


def test_blocks_give_the_same_scores():
    rng = np.random.RandomState(0)
    bank, labels, queries = rng.randn(300, 16), rng.randint(0, 7, 300), rng.randn(50, 16)
    whole = knn.knn_scores(bank, labels, queries, k=20, num_classes=7)
    blocked = knn.knn_scores(bank, labels, queries, k=20, num_classes=7, block_size=7)
    np.testing.assert_allclose(blocked, whole, rtol=1e-6)
    assert whole.shape == (50, 7)


def official_knn_predict(feature, feature_bank, feature_labels, classes, knn_k, knn_t):
    """facebookresearch/moco colab demo (moco_cifar10_demo.ipynb), verbatim."""
    sim_matrix = torch.mm(feature, feature_bank)
    sim_weight, sim_indices = sim_matrix.topk(k=knn_k, dim=-1)
    sim_labels = torch.gather(feature_labels.expand(feature.size(0), -1), dim=-1, index=sim_indices)
    sim_weight = (sim_weight / knn_t).exp()
    one_hot_label = torch.zeros(feature.size(0) * knn_k, classes, device=sim_labels.device)
    one_hot_label = one_hot_label.scatter(dim=-1, index=sim_labels.view(-1, 1), value=1.0)
    pred_scores = torch.sum(one_hot_label.view(feature.size(0), -1, classes) * sim_weight.unsqueeze(dim=-1), dim=1)
    return pred_scores.argsort(dim=-1, descending=True)


def test_matches_the_official_demo():
    rng = np.random.RandomState(1)
    bank, labels, queries = rng.randn(1000, 32), rng.randint(0, 10, 1000), rng.randn(200, 32)
    norm = lambda x: torch.nn.functional.normalize(torch.from_numpy(x).float(), dim=1)  # noqa: E731
    expected = official_knn_predict(norm(queries), norm(bank).t(), torch.from_numpy(labels), 10, 200, 0.1)
    ours = knn.knn_predict(bank, labels, queries, k=200, t=0.1, num_classes=10)
    np.testing.assert_array_equal(ours, expected[:, 0].numpy())


@pytest.fixture(scope="module")
def digits():
    source = sources.make_source("digits")
    train = pipelines.labelled_dataset(source, "train", 32, 32).take(3)  # 96 images
    val = pipelines.labelled_dataset(source, "test", 32, 16).take(2)  # 32 images
    return source, train, val


class Holder(keras.Model):
    """The one thing KNNMonitor needs of a MoCo model: `backbone_q`."""

    def __init__(self, backbone):
        super().__init__(name="holder")
        self.backbone_q = backbone
        self.fc = keras.layers.Dense(1)

    def call(self, x):
        return self.fc(self.backbone_q(x))


def test_monitor_logs_top1_in_inference_mode(digits, tmp_path):
    source, train, val = digits
    backbone = resnet("resnet18", cifar_stem=True)
    randomize(backbone)
    before = [np.array(w) for w in backbone.weights]
    monitor = knn.KNNMonitor(train, val, every_n_epochs=2, log_dir=str(tmp_path), class_names=source.class_names)
    monitor.set_model(Holder(backbone))
    logs = {}
    monitor.on_epoch_end(0, logs)
    assert logs == {}  # not an evaluation epoch
    monitor.on_epoch_end(1, logs)
    monitor.on_train_end()
    assert 0.0 <= logs["knn_top1"] <= 100.0 and logs["knn_top1"] <= logs["knn_top5"]
    for b, w in zip(before, backbone.weights, strict=True):
        np.testing.assert_array_equal(b, np.array(w), err_msg=w.path)  # BN statistics untouched
    # The same number as a direct evaluation of the same features.
    train_f, train_l = knn.extract_features(backbone, train)
    val_f, val_l = knn.extract_features(backbone, val)
    assert logs["knn_top1"] == pytest.approx(knn.knn_accuracy(train_f, train_l, val_f, val_l)["top1"])
    tags = set()
    for event_file in glob.glob(os.path.join(str(tmp_path), "knn", "events.*")):
        for record in tf.compat.v1.train.summary_iterator(event_file):
            tags.update(v.tag for v in record.summary.value)
    assert {"knn_top1", "knn_top5", "knn_retrieval"} <= tags


def test_monitor_inside_fit(digits):
    _, train, val = digits
    backbone = keras.Sequential(
        [keras.Input((32, 32, 3)), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(8)]
    )
    model = Holder(backbone)
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.zeros((4, 32, 32, 3), np.float32), np.zeros((4, 1), np.float32)
    history = model.fit(x, y, epochs=2, verbose=0, callbacks=[knn.KNNMonitor(train, val, every_n_epochs=1)])
    assert len(history.history["knn_top1"]) == 2
    # Every 2 epochs over 3: epoch 2, and epoch 3 because it is the run's last.
    evaluated = []
    seen = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: evaluated.append("knn_top1" in logs))
    model.fit(x, y, epochs=3, verbose=0, callbacks=[knn.KNNMonitor(train, val, every_n_epochs=2, final_epoch=3), seen])
    assert evaluated == [False, True, True]


def test_repeated_evaluations_trace_once_and_never_warn(digits):
    """Evaluating the same backbone every epoch reuses one traced function: TensorFlow's retracing
    warning ("N out of the last M calls ... triggered tf.function retracing"), which a new function
    per evaluation printed from the fifth on, never appears."""
    source, train, val = digits
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    tf_logger = logging.getLogger("tensorflow")
    tf_logger.addHandler(handler)
    try:
        backbone = resnet("resnet18", cifar_stem=True, width=8)
        monitor = knn.KNNMonitor(train, val, every_n_epochs=1, num_classes=source.num_classes)
        monitor.set_model(Holder(backbone))
        for epoch in range(6):
            monitor.on_epoch_end(epoch, {})
    finally:
        tf_logger.removeHandler(handler)
    assert not [m for m in messages if "retracing" in m], messages
    fn = frozen.inference_fn(backbone)
    assert fn is frozen.inference_fn(backbone)  # one function per backbone
    assert fn.experimental_get_tracing_count() <= 2  # full batches, then the last partial one
    # The cache does not keep a backbone alive.
    cached = len(frozen._compiled)
    del backbone, monitor, fn
    gc.collect()
    assert len(frozen._compiled) < cached


def test_cli(tmp_path):
    backbone = resnet("resnet18", cifar_stem=True)
    config = {"arch": "resnet18", "cifar_stem": True, "image_size": 32}
    path = hub.export_backbone(backbone, str(tmp_path / "r18"), config)
    grid = tmp_path / "grid.png"
    result = run(
        "-m",
        "moco_tf.knn",
        f"--pretrained={path}",
        "--dataset=digits",
        "--limit_train=64",
        "--limit_val=16",
        "--batch_size=32",
        f"--retrieval_grid={grid}",
        "--grid_queries=3",
        "--grid_neighbours=4",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "top-1" in result.stdout and "16 test images, bank of 64 train images" in result.stdout
    image = tf.io.decode_png(tf.io.read_file(str(grid))).numpy()
    assert image.shape[0] == 3 * (96 + 6 + 14)
    bad = run("-m", "moco_tf.knn", f"--pretrained={tmp_path / 'missing'}", "--dataset=digits")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: --pretrained=")
    assert "Traceback" not in bad.stderr


def test_mirrored_extraction_gives_the_one_device_result(digits):
    """Two replicas (2 logical CPUs) each embed half of every batch; the gathered features, in
    the original order, give the one-device top-1 and top-5, and no retracing warning."""
    from moco_tf.training.distribute import mirrored

    source, train, val = digits
    backbone = resnet("resnet18", cifar_stem=True, width=8)
    randomize(backbone)
    one = knn.evaluate(backbone, train, val, k=20, num_classes=source.num_classes)
    strategy = mirrored()
    assert strategy.num_replicas_in_sync == 2
    features, labels = knn.extract_features(backbone, val, strategy=strategy)
    local_features, local_labels = knn.extract_features(backbone, val)
    np.testing.assert_array_equal(labels, local_labels)  # same order
    np.testing.assert_allclose(features, local_features, rtol=1e-5, atol=1e-6)
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("tensorflow").addHandler(handler)
    try:
        for _ in range(6):
            two = knn.evaluate(backbone, train, val, k=20, num_classes=source.num_classes, strategy=strategy)
    finally:
        logging.getLogger("tensorflow").removeHandler(handler)
    assert (two.top1, two.top5, two.num_train, two.num_val) == (one.top1, one.top5, 96, 32)
    assert not [m for m in messages if "retracing" in m], messages


def _top(stdout: str) -> str:
    """The "top-1 X%  top-5 Y%" of the result line."""
    line = [x for x in stdout.splitlines() if x.startswith("kNN (k=")][-1]
    return line[line.index("top-1") : line.index("(", line.index("top-1"))].strip()


# Slow: CI runs the same evaluation set-up on 2 local workers in tests/test_evaluation_linear.py
# (cli_evaluation.setup, sharded extraction), and pretraining's in test_run_multiworker_resume.py.
@pytest.mark.slow
def test_cli_multi_worker_reports_the_one_device_result(tmp_path):
    """Two local workers (TF_CONFIG on 127.0.0.1, one replica each) extract half of the features
    each; both print the one-device top-1 and top-5; only the chief writes the grid."""
    backbone = resnet("resnet18", cifar_stem=True, width=8)
    randomize(backbone)
    path = hub.export_backbone(backbone, str(tmp_path / "r18"), {"arch": "resnet18", "cifar_stem": True,
                                                                   "image_size": 32, "width": 8})  # fmt: skip
    args = [f"--pretrained={path}", "--dataset=digits", "--limit_train=96", "--limit_val=40", "--batch_size=16",
            "--k=20", "--mixed_precision=none"]  # fmt: skip
    source = sources.make_source("digits")
    one = knn.evaluate(backbone, pipelines.labelled_dataset(source, "train", 32, 16, subset=96),
                       pipelines.labelled_dataset(source, "test", 32, 16, subset=40), k=20, num_classes=10)  # fmt: skip
    expected = f"top-1 {one.top1:.2f}%  top-5 {one.top5:.2f}%"
    results = run_local_workers([
        ["-m", "moco_tf.knn", *args, "--strategy=multi_worker", "--peer_timeout=60",
         f"--retrieval_grid={tmp_path / f'grid{i}.png'}", "--grid_queries=2", "--grid_neighbours=2"]
        for i in range(2)
    ])  # fmt: skip
    for returncode, out, err in results:
        assert returncode == 0, err[-3000:]
        assert _top(out) == expected, out
        assert "40 test images, bank of 96 train images" in out
    assert (tmp_path / "grid0.png").exists() and not (tmp_path / "grid1.png").exists()


def test_mixed_precision_backbone_gives_float32_features(digits):
    """--mixed_precision: the backbone rebuilt under the policy computes in bfloat16; the features
    come back float32 and close to the float32 backbone's (bfloat16 keeps ~3 significant digits)."""
    _, _, val = digits
    backbone = resnet("resnet18", cifar_stem=True, width=8)
    randomize(backbone)
    reference, labels = knn.extract_features(backbone, val)
    try:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        low = frozen.replicate(frozen.FrozenBackbone(backbone), lambda: resnet("resnet18", cifar_stem=True, width=8),
                               tf.distribute.get_strategy())  # fmt: skip
        features, low_labels = knn.extract_features(low, val)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert low.model.compute_dtype == "bfloat16" and features.dtype == np.float32
    np.testing.assert_array_equal(low_labels, labels)
    cosine = np.sum(knn._normalize(features) * knn._normalize(reference), axis=1)
    assert cosine.min() > 0.99, cosine.min()
