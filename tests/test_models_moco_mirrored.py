"""MoCo under MirroredStrategy over 2 logical CPU devices (made in conftest.py)."""

import numpy as np
import tensorflow as tf

from moco_tf.models.losses import info_nce
from moco_tf.models.moco import MoCo
from moco_tf.training.distribute import mirrored
from moco_tf.training.optimizers import SGD

GLOBAL_BATCH, QUEUE = 8, 32


def _per_replica(variable):
    return [np.asarray(v) for v in variable.value.values]


def test_mirrored_replicas_stay_identical_and_enqueue_the_global_keys():
    strategy = mirrored(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = MoCo("resnet18", dim=8, queue_size=QUEUE, moco_momentum=0.9, cifar_stem=True)
        model.compile(optimizer=SGD(0.1))
    assert strategy.num_replicas_in_sync == 2
    views = tf.random.normal([3 * GLOBAL_BATCH, 2, 32, 32, 3], seed=5)
    dataset = tf.data.Dataset.from_tensor_slices(views).batch(GLOBAL_BATCH, drop_remainder=True)
    model.fit(dataset, epochs=2, verbose=0)  # 3 steps an epoch

    # Every replica holds the same queue, pointer and BN statistics, bit for bit (mean-aggregated
    # statistics, queue written from all-gathered keys).
    everything = [*model.encoder_k.weights, *model.encoder_q.weights]
    statistics = [w for w in everything if "moving_" in w.path]
    parameters = [w for w in everything if "moving_" not in w.path]
    exact = [model.queue, model.queue_ptr, *statistics]
    for weight in exact:
        copies = _per_replica(weight)
        assert len(copies) == 2
        np.testing.assert_array_equal(copies[0], copies[1], err_msg=weight.path)
    assert len(exact) > 80
    # Parameters (query, and the key encoder that averages them) agree to float rounding: on CPU
    # the per-device SGD kernels round differently in the last bit (seen: 1.5e-8 after 2 steps).
    for weight in parameters:
        copies = _per_replica(weight)
        np.testing.assert_allclose(copies[0], copies[1], rtol=0, atol=1e-6, err_msg=weight.path)
    assert int(np.asarray(model.queue_ptr)) == (6 * GLOBAL_BATCH) % QUEUE

    # One more step by hand, to recompute its keys and loss eagerly for the whole global batch.
    batch = views[:GLOBAL_BATCH]
    k_before = [np.asarray(w) for w in model.encoder_k.weights]
    q_before = [np.asarray(w) for w in model.encoder_q.weights]
    queue_before = np.asarray(model.queue)
    ptr = int(np.asarray(model.queue_ptr))
    for metric in model.metrics:
        metric.reset_state()
    step = tf.function(model.train_step)
    for x in strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(batch)):
        strategy.run(step, args=(x,))
    reported = float(model.loss_tracker.result())

    # Eager reference: EMA weights, the same shuffle (seed = step counter before the step), and
    # BatchNorm over each replica's half of the shuffled batch.
    probe = MoCo("resnet18", dim=8, queue_size=QUEUE, cifar_stem=True)
    for w, wk, wq, v in zip(probe.encoder_k.weights, k_before, q_before, model.encoder_q.weights, strict=True):
        w.assign(0.9 * wk + 0.1 * wq if v.trainable else wk)
        if not v.trainable:
            w.assign(wk)
    for w, wq in zip(probe.encoder_q.weights, q_before, strict=True):
        w.assign(wq)
    bits = tf.random.stateless_uniform(
        [GLOBAL_BATCH], seed=[int(np.asarray(model.optimizer.iterations)) - 1, 0], minval=None, maxval=None,
        dtype=tf.uint32, alg="philox",
    )
    perm = tf.argsort(tf.cast(bits, tf.int64), stable=True)
    half = GLOBAL_BATCH // 2

    def per_replica(encoder, x):
        return tf.concat([encoder(x[i * half:(i + 1) * half], training=True) for i in range(2)], axis=0)

    keys = tf.math.l2_normalize(per_replica(probe.encoder_k, tf.gather(batch[:, 1], perm)), axis=1)
    keys = tf.gather(keys, tf.argsort(perm)).numpy()
    np.testing.assert_allclose(np.asarray(model.queue)[ptr:ptr + GLOBAL_BATCH], keys, atol=2e-5)

    queries = tf.math.l2_normalize(per_replica(probe.encoder_q, batch[:, 0]), axis=1)
    losses = [
        float(info_nce(queries[i * half:(i + 1) * half], keys[i * half:(i + 1) * half], queue_before, 0.07)[0])
        for i in range(2)
    ]
    assert abs(reported - np.mean(losses)) < 1e-4, (reported, losses)
