"""The MoCo model: shapes and parameter counts, the official step against PyTorch, EMA, queue."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from moco_tf.models import resnet
from moco_tf.models.moco import MoCo, self_negative_rate
from moco_tf.training.optimizers import SGD


@pytest.mark.parametrize("arch,count", [("resnet18", 11_689_512), ("resnet50", 25_557_032)])
def test_parameter_count_equals_torchvision(arch, count):
    backbone = resnet.resnet(arch)
    params = sum(int(np.prod(w.shape)) for w in backbone.trainable_weights)
    width = resnet.feature_dim(arch)
    assert params + width * 1000 + 1000 == count  # torchvision counts its 1000-way fc


@pytest.mark.parametrize("width,cifar_stem", [(64, False), (32, False), (32, True), (8, True)])
def test_narrow_resnet18_parameter_count_by_hand(width, cifar_stem):
    """resnet18 trainable parameters are 2724 w^2 + (147 or 27) w + 150 w: the w^2 terms are the
    3x3 and 1x1 convs of the four stages (36 + 128 + 512 + 2048), conv1 is 7x7x3 (3x3x3 with the
    CIFAR stem) and every BatchNorm has 2 parameters per channel (2w for bn1, 148w in the stages).
    At w = 64 with the ImageNet stem this is torchvision's 11,176,512 (without its fc)."""
    backbone = resnet.resnet("resnet18", cifar_stem=cifar_stem, width=width)
    params = sum(int(np.prod(w.shape)) for w in backbone.trainable_weights)
    assert params == 2724 * width**2 + (27 if cifar_stem else 147) * width + 150 * width
    assert resnet.feature_dim("resnet18", width) == 8 * width == backbone.output.shape[-1]
    if width == 64 and not cifar_stem:
        assert params == 11_689_512 - 512 * 1000 - 1000


def test_narrow_widths():
    assert resnet.feature_dim("resnet50", 16) == 512
    model = MoCo("resnet18", dim=8, queue_size=16, cifar_stem=True, width=8, image_size=32)
    assert model.get_config()["width"] == 8 and MoCo.from_config(model.get_config()).width == 8
    assert model.backbone_q(tf.zeros([2, 32, 32, 3])).shape == (2, 64)
    for width in (0, -4):
        with pytest.raises(ValueError, match="width must be a positive"):
            resnet.resnet("resnet18", width=width)


@pytest.mark.parametrize(
    "arch,cifar_stem,size,shapes",
    [
        ("resnet18", False, 224, [(56, 64), (28, 128), (14, 256), (7, 512)]),
        ("resnet50", False, 224, [(56, 256), (28, 512), (14, 1024), (7, 2048)]),
        ("resnet18", True, 32, [(32, 64), (16, 128), (8, 256), (4, 512)]),
    ],
)
def test_stage_shapes(arch, cifar_stem, size, shapes):
    backbone = resnet.resnet(arch, cifar_stem=cifar_stem)
    _, counts = resnet.SPECS[int(arch[6:])]
    stage_outputs = [backbone.get_layer(f"layer{i}.{counts[i - 1] - 1}.out").output for i in range(1, 5)]
    probe = tf.keras.Model(backbone.input, stage_outputs)
    outs = probe(tf.zeros([1, size, size, 3]))
    assert [(o.shape[1], o.shape[3]) for o in outs] == shapes
    assert backbone(tf.zeros([2, size, size, 3])).shape == (2, resnet.feature_dim(arch))


def test_key_encoder_starts_as_copy_and_is_not_trainable():
    model = MoCo("resnet18", dim=16, queue_size=32, cifar_stem=True)
    for k, q in zip(model.encoder_k.weights, model.encoder_q.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(k), np.asarray(q))
    assert model.encoder_k.trainable_weights == []
    assert len(model.encoder_q.trainable_weights) > 0
    queue = np.asarray(model.queue)
    np.testing.assert_allclose(np.linalg.norm(queue, axis=1), 1.0, atol=1e-5)
    assert int(model.queue_ptr) == 0
    # The queue lives in the model's weights, so it is saved and restored with them.
    assert any(w.path.endswith("queue") for w in model.weights)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="temperature"):
        MoCo("resnet18", temperature=0.0)
    with pytest.raises(ValueError, match="momentum"):
        MoCo("resnet18", moco_momentum=1.0)
    with pytest.raises(ValueError, match="unknown arch"):
        MoCo("resnet19")


def test_queue_not_multiple_of_batch_stops_before_compute():
    model = MoCo("resnet18", dim=8, queue_size=20, cifar_stem=True)
    model.compile(optimizer=SGD(0.1))
    with pytest.raises(ValueError, match="queue_size 20 is not a multiple"):
        model.train_step(tf.zeros([8, 2, 32, 32, 3]))
    assert model.optimizer.iterations.numpy() == 0
    symmetric = MoCo("resnet18", dim=8, queue_size=24, cifar_stem=True, symmetric=True)
    with pytest.raises(ValueError, match="x 2"):
        symmetric.check_batch_size(8)  # 16 keys per step


def test_ema_and_enqueue_by_hand():
    """One step: key params = m*k + (1-m)*q_before; BN stats of k from its own pass; rows = keys."""
    m = 0.9
    model = MoCo("resnet18", dim=8, queue_size=24, moco_momentum=m, cifar_stem=True)
    model.compile(optimizer=SGD(0.5))
    # Make q and k differ so the average is visible.
    for w in model.encoder_q.trainable_weights:
        w.assign(w + 0.01)
    q_before = [np.asarray(w) for w in model.encoder_q.weights]
    k_before = [np.asarray(w) for w in model.encoder_k.weights]
    x = tf.random.normal([8, 2, 32, 32, 3], seed=1)

    # The keys recomputed eagerly: EMA weights applied to a copy, BN in training mode.
    probe = MoCo("resnet18", dim=8, queue_size=24, cifar_stem=True)
    for w, wq, wk, v in zip(probe.encoder_k.weights, q_before, k_before, model.encoder_q.weights, strict=True):
        w.assign(m * wk + (1 - m) * wq if v.trainable else wk)
    expected_keys = tf.math.l2_normalize(probe.encoder_k(x[:, 1], training=True), axis=1).numpy()

    model.train_step(x)
    for wk, wq, kb, v in zip(model.encoder_k.weights, q_before, k_before, model.encoder_q.weights, strict=True):
        if v.trainable:
            np.testing.assert_allclose(np.asarray(wk), m * kb + (1 - m) * wq, rtol=1e-6, atol=1e-7)
    for wk, wp in zip(model.encoder_k.weights, probe.encoder_k.weights, strict=True):
        if not wk.trainable and "moving" in wk.path:
            np.testing.assert_allclose(np.asarray(wk), np.asarray(wp), rtol=1e-5, atol=1e-6)
    queue = np.asarray(model.queue)
    np.testing.assert_allclose(queue[:8], expected_keys, atol=1e-5)
    assert int(model.queue_ptr) == 8

    # Wrap-around: 24 / 8 = 3 steps fill the queue, the 4th overwrites rows 0..7 again.
    model.train_step(x)
    model.train_step(x)
    assert int(model.queue_ptr) == 0
    before = np.asarray(model.queue).copy()
    model.train_step(x)
    after = np.asarray(model.queue)
    assert int(model.queue_ptr) == 8
    assert not np.allclose(after[:8], before[:8])
    np.testing.assert_array_equal(after[8:], before[8:])


def test_xla_step_equals_plain_step():
    """In float64, so that float32 rounding of the ill-conditioned first-conv gradients (which XLA
    orders differently) cannot hide or fake a difference in the algorithm."""
    keras.config.set_floatx("float64")
    try:
        x = tf.random.normal([8, 2, 32, 32, 3], seed=3, dtype=tf.float64)
        results = []
        for jit in (False, True):
            keras.utils.set_random_seed(7)
            model = MoCo("resnet18", dim=8, queue_size=16, moco_momentum=0.9, cifar_stem=True, bn_groups=2, width=8)
            model.compile(optimizer=SGD(0.1), jit_compile=jit)
            data = {"views": x, "ids": tf.range(8)}  # the same 8 images twice
            history = model.fit(tf.data.Dataset.from_tensors(data).repeat(), steps_per_epoch=2, epochs=1, verbose=0)
            results.append((history.history, [np.asarray(w) for w in [model.queue, *model.weights]]))
    finally:
        keras.config.set_floatx("float32")
    (logs_a, weights_a), (logs_b, weights_b) = results
    assert abs(logs_a["loss"][0] - logs_b["loss"][0]) < 1e-9
    # Step 1 meets an unknown queue, step 2 finds every image of step 1: mean 0.5.
    assert logs_a["self_neg"] == logs_b["self_neg"] == [0.5]
    for a, b in zip(weights_a, weights_b, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-9)


def test_train_on_batch_equals_fit():
    """train_on_batch hands the step (x, None, None); it must train exactly as fit does."""
    x = tf.random.normal([8, 2, 32, 32, 3], seed=5).numpy()
    results = []
    for use_fit in (False, True):
        keras.utils.set_random_seed(11)
        model = MoCo("resnet18", dim=8, queue_size=16, moco_momentum=0.9, cifar_stem=True, bn_groups=2, width=8)
        model.compile(optimizer=SGD(0.1, momentum=0.9))
        if use_fit:
            loss = model.fit(tf.data.Dataset.from_tensors(x), epochs=1, verbose=0).history["loss"][0]
        else:
            loss = model.train_on_batch(x, return_dict=True)["loss"]
        results.append((float(loss), [np.asarray(w) for w in [model.queue, *model.weights]]))
    (loss_a, weights_a), (loss_b, weights_b) = results
    assert abs(loss_a - loss_b) < 1e-6
    for a, b in zip(weights_a, weights_b, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# the id queue and self_neg


def test_self_negative_rate_by_hand():
    queue_ids = tf.constant([7, -1, 2, 3, 3])
    # 3 and 7 are in the queue, 5 is not, and an unknown id (-1) never matches the unknown rows.
    assert float(self_negative_rate(tf.constant([3, 7, -1, 5]), queue_ids)) == 0.5
    assert float(self_negative_rate(tf.constant([0, 1]), tf.fill([4], -1))) == 0.0


def _id_step(model, views, ids):
    for metric in model.metrics:
        metric.reset_state()
    return model.train_step({"views": views, "ids": tf.constant(ids, tf.int32)})


@pytest.mark.parametrize("symmetric", [False, True])
def test_id_queue_and_self_neg_by_hand(symmetric):
    """Batch 4, queue 8 (16 with symmetric: both view orders enqueue the same 4 ids)."""
    queue = 16 if symmetric else 8
    model = MoCo("resnet18", dim=8, queue_size=queue, cifar_stem=True, width=8, symmetric=symmetric)
    model.compile(optimizer=SGD(0.1))
    np.testing.assert_array_equal(np.asarray(model.queue_ids), [-1] * queue)
    views = tf.random.normal([4, 2, 32, 32, 3], seed=2)
    rates = [float(_id_step(model, views, ids)["self_neg"]) for ids in ([0, 1, 2, 3], [2, 3, 4, 5], [9, 0, 8, 7])]
    # Step 1 meets an empty (unknown) queue; step 2 finds 2 and 3; step 3 finds 0 (8 and 7 are new).
    assert rates == [0.0, 0.5, 0.25]
    copies = 2 if symmetric else 1
    expected = [9, 0, 8, 7] * copies + [2, 3, 4, 5] * copies  # step 3 wrapped over step 1's rows
    np.testing.assert_array_equal(np.asarray(model.queue_ids), expected)
    assert int(model.queue_ptr) == 4 * copies

    # Plain view pairs carry no ids: no self_neg in the logs, and the rows they fill are unknown.
    logs = model.train_step(views)
    assert "self_neg" not in logs and "loss" in logs
    np.testing.assert_array_equal(np.asarray(model.queue_ids)[4 * copies : 8 * copies], [-1] * 4 * copies)


def test_id_queue_under_mirrored_strategy():
    """2 replicas, global batch 8: ids are all-gathered in replica order beside the keys, every
    replica holds the same id queue, and self_neg averages over the replicas' queries."""
    from moco_tf.training.distribute import mirrored

    strategy = mirrored(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = MoCo("resnet18", dim=8, queue_size=16, cifar_stem=True, width=8)
        model.compile(optimizer=SGD(0.1))
    views = tf.random.normal([16, 2, 32, 32, 3], seed=4)
    ids = tf.constant([0, 1, 2, 3, 4, 5, 6, 7, 4, 5, 6, 7, 8, 9, 10, 11])
    data = tf.data.Dataset.from_tensor_slices({"views": views, "ids": ids}).batch(8, drop_remainder=True)
    history = model.fit(data, epochs=1, verbose=0)
    # Step 2: replica 0's queries 4..7 are all in the queue, replica 1's 8..11 none: 0.5; step 1: 0.
    assert history.history["self_neg"][0] == pytest.approx(0.25)
    copies = [np.asarray(v) for v in model.queue_ids.value.values]
    assert len(copies) == 2
    for copy in copies:
        np.testing.assert_array_equal(copy, ids.numpy())


def test_self_neg_reaches_step_lines_and_epoch_summary(capsys):
    """The same 8 images twice into a queue of 16: self_neg 0 then 1, printed as the running mean."""
    from moco_tf.training.callbacks import StepLines, TrainingLogs

    model = MoCo("resnet18", dim=8, queue_size=16, cifar_stem=True, width=8)
    model.compile(optimizer=SGD(0.1))
    data = {"views": tf.random.normal([8, 2, 32, 32, 3], seed=8), "ids": tf.range(8)}
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([1000], [0.1, 0.1])
    callbacks = [TrainingLogs(schedule, 8, 1), StepLines(schedule, 8, 1, 2)]
    model.fit(tf.data.Dataset.from_tensors(data).repeat(), steps_per_epoch=2, epochs=1, verbose=0, callbacks=callbacks)
    lines = capsys.readouterr().out.splitlines()
    assert "| self_neg 0 |" in lines[0] and lines[0].startswith("step 1/2")
    assert "| self_neg 0.5 |" in lines[1] and lines[1].startswith("step 2/2")
    assert "| self_neg 0.5 |" in lines[2] and lines[2].startswith("epoch 1/1")
