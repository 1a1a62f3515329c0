"""moco_tf.models.batchnorm against PyTorch: the official CIFAR demo's SplitBatchNorm (and plain
BatchNorm1d/2d) forward, gradients, running statistics and inference, for the fused float32 path
and the plain-op float64 path."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import torch

from moco_tf.models.batchnorm import BatchNorm
from tests.support import torch_reference as ref

CASES = {"float32": (tf.float32, torch.float32, 2e-5), "float64": (tf.float64, torch.float64, 1e-12)}


def _torch_step(x_nchw, groups, gamma, beta, upstream, dtype):
    norm = ref.SplitBatchNorm(x_nchw.shape[1], groups) if groups > 1 else torch.nn.BatchNorm2d(x_nchw.shape[1])
    if x_nchw.dim() == 2:
        norm = torch.nn.BatchNorm1d(x_nchw.shape[1])
    norm = norm.to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(gamma))
        norm.bias.copy_(torch.from_numpy(beta))
    x = x_nchw.clone().requires_grad_(True)
    out = norm.train()(x)
    (out * upstream).sum().backward()
    return out, x.grad, norm


@pytest.mark.parametrize("precision", ["float32", "float64"])
@pytest.mark.parametrize("shape,groups", [((16, 5, 3, 6), 1), ((16, 5, 3, 6), 4), ((12, 7), 1)])
def test_training_step_matches_pytorch(precision, shape, groups):
    tf_dtype, torch_dtype, tol = CASES[precision]
    rng = np.random.RandomState(groups + len(shape))
    x = (rng.randn(*shape) * 2 + 0.5).astype(precision)
    upstream = rng.randn(*shape).astype(precision)
    gamma = rng.uniform(0.5, 1.5, shape[-1]).astype(precision)
    beta = rng.randn(shape[-1]).astype(precision)

    keras.config.set_floatx(precision)
    try:
        layer = BatchNorm(num_groups=groups)
        layer.build(shape)
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)
        x_tf = tf.constant(x, tf_dtype)
        with tf.GradientTape() as tape:
            tape.watch(x_tf)
            out = layer(x_tf, training=True)
            objective = tf.reduce_sum(out * upstream)
        dx, dgamma, dbeta = tape.gradient(objective, [x_tf, layer.gamma, layer.beta])
        moving = [np.asarray(layer.moving_mean), np.asarray(layer.moving_variance)]
        inference = layer(x_tf, training=False).numpy()
    finally:
        keras.config.set_floatx("float32")

    def nchw(a):  # NHWC numpy -> NCHW torch (2-D inputs stay as they are)
        return torch.from_numpy(a.transpose(0, 3, 1, 2).copy() if a.ndim == 4 else a).to(torch_dtype)

    def nhwc(t):
        a = t.detach().numpy()
        return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a

    t_out, t_dx, norm = _torch_step(nchw(x), groups, gamma, beta, nchw(upstream), torch_dtype)
    np.testing.assert_allclose(out.numpy(), nhwc(t_out), rtol=0, atol=tol)
    np.testing.assert_allclose(dx.numpy(), nhwc(t_dx), rtol=0, atol=tol * 10)
    np.testing.assert_allclose(dgamma.numpy(), norm.weight.grad.numpy(), rtol=tol, atol=tol * 10)
    np.testing.assert_allclose(dbeta.numpy(), norm.bias.grad.numpy(), rtol=tol, atol=tol * 10)
    np.testing.assert_allclose(moving[0], norm.running_mean.numpy(), rtol=0, atol=tol)
    np.testing.assert_allclose(moving[1], norm.running_var.numpy(), rtol=0, atol=tol)  # unbiased, as PyTorch
    np.testing.assert_allclose(inference, nhwc(norm.eval()(nchw(x))), rtol=0, atol=tol * 10)


def test_groups_normalize_interleaved_samples_independently():
    """Group g holds samples g, g + G, ...: each group of the output has mean beta, std gamma."""
    x = tf.random.normal([8, 4, 4, 3], seed=1) * 3 + 2
    layer = BatchNorm(num_groups=2)
    out = layer(x, training=True).numpy()
    for g in range(2):
        part = out[g::2]
        np.testing.assert_allclose(part.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
        np.testing.assert_allclose(part.std(axis=(0, 1, 2)), 1.0, atol=1e-3)


def test_fused_path_under_xla_equals_plain_tf():
    """The float32 (fused) training path compiles with XLA (TPU, jit_compile) to the same values."""
    layer = BatchNorm(num_groups=4)
    x = tf.random.normal([16, 4, 4, 6], seed=2) * 2 + 1
    layer.build(x.shape)

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = layer(x, training=True)
            objective = tf.reduce_sum(out * tf.range(6, dtype=tf.float32))
        return out, tape.gradient(objective, x)

    plain = tf.function(step)(x)
    moving_plain = layer.moving_variance.numpy()
    xla = tf.function(step, jit_compile=True)(x)
    for a, b in zip(plain, xla, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-4)
    # Both updates saw the same batch: v1 = 0.9 * 1 + 0.1 * batch_var, then v2 = 0.9 * v1 + 0.1 * batch_var.
    batch_var = (moving_plain - 0.9) / 0.1
    np.testing.assert_allclose(layer.moving_variance.numpy(), 0.9 * moving_plain + 0.1 * batch_var, rtol=1e-5)
