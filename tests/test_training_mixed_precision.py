"""Mixed precision (--mixed_precision=bf16 / fp16) against float32 on a tiny model, on CPU: the
encoders compute in the low dtype; loss, logits, keys, queue and weights stay float32; one step
from the same weights on the same batch lands near the float32 step; fp16 scales the loss."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from moco_tf.models.losses import info_nce
from moco_tf.models.moco import MoCo
from moco_tf.training.config import PRECISION_POLICIES
from moco_tf.training.optimizers import SGD


def _model(policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = MoCo("resnet18", width=8, cifar_stem=True, dim=16, queue_size=64, temperature=0.2,
                     mlp=True, bn_groups=2, image_size=16)  # fmt: skip
        model.compile(optimizer=SGD(0.05, momentum=0.9))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return model


def _step(model, views):
    logs = model.train_on_batch(views, return_dict=True)
    return {name: float(value) for name, value in logs.items()}


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_one_mixed_step_against_float32(name):
    views = tf.constant(np.random.default_rng(0).normal(size=(16, 2, 16, 16, 3)), tf.float32)
    reference = _model("float32")
    mixed = _model(PRECISION_POLICIES[name])
    for target, source in zip(mixed.weights, reference.weights, strict=True):
        target.assign(source)
    assert mixed.encoder_q.backbone.compute_dtype == ("bfloat16" if name == "bf16" else "float16")
    if name == "fp16":
        assert isinstance(mixed.optimizer, keras.optimizers.LossScaleOptimizer)
    # Everything stored is float32 in both.
    assert all(w.dtype == "float32" for w in mixed.weights if w.dtype != "int32")

    ref_logs, mixed_logs = _step(reference, views), _step(mixed, views)
    # Measured: bf16 (8-bit mantissa) moves loss and logits by <= 6e-3, the keys by 1.3e-2, and the
    # step's direction to cosine 0.95; fp16 by 1e-4 and cosine 0.99. Bounds at 2-5x those.
    tol = {"bf16": 0.03, "fp16": 0.003}[name]
    for key in ("loss", "logit_pos", "logit_neg"):
        assert abs(mixed_logs[key] - ref_logs[key]) < tol, (key, mixed_logs[key], ref_logs[key])
    assert mixed.queue.dtype == "float32"
    enqueued = mixed.queue.numpy()[:16]
    np.testing.assert_allclose(np.linalg.norm(enqueued, axis=1), 1.0, atol=1e-5)  # normalised in float32
    np.testing.assert_allclose(enqueued, reference.queue.numpy()[:16], atol=tol)
    # The step moved the weights as float32's did, to low-precision rounding. (The key encoder took
    # its momentum update before the step, from equal encoders: it still holds the start weights.)
    def step(model):
        return np.concatenate([
            (q.numpy() - k.numpy()).ravel()
            for q, k in zip(model.encoder_q.weights, model.encoder_k.weights, strict=True)
            if q.trainable
        ])

    step_ref, step_mixed = step(reference), step(mixed)
    cosine = step_ref @ step_mixed / np.linalg.norm(step_ref) / np.linalg.norm(step_mixed)
    assert cosine > {"bf16": 0.9, "fp16": 0.98}[name], cosine


def test_info_nce_computes_in_float32_from_low_precision_inputs():
    rng = np.random.default_rng(1)
    q, k, queue = (tf.math.l2_normalize(rng.normal(size=s), axis=1) for s in ((4, 8), (4, 8), (32, 8)))
    loss, l_pos, l_neg = info_nce(tf.cast(q, tf.bfloat16), tf.cast(k, tf.bfloat16), tf.cast(queue, tf.float32), 0.2)
    assert loss.dtype == l_pos.dtype == l_neg.dtype == tf.float32
    ref_loss, _, _ = info_nce(tf.cast(q, tf.float32), tf.cast(k, tf.float32), tf.cast(queue, tf.float32), 0.2)
    assert abs(float(loss) - float(ref_loss)) < 0.05
