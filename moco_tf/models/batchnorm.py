"""Batch normalization with PyTorch's semantics, split into groups, synced across replicas.

Why not `keras.layers.BatchNormalization`:
- PyTorch updates `running_var` with the unbiased batch variance, Keras with the biased one;
  official MoCo weights and a step-for-step match with the reference need PyTorch's rule.
- MoCo's CIFAR demo normalizes a batch in `num_groups` independent groups (SplitBatchNorm),
  the one-device stand-in for shuffle BN across GPUs.
- Keras keeps one copy of the moving statistics per replica, and the copies drift; here the
  moving statistics are mean-aggregated variables, so every replica holds the same values.
"""

from __future__ import annotations

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="moco_tf")
class BatchNorm(keras.layers.Layer):
    """BatchNorm2d (or 1d) over the last axis, as `torch.nn.BatchNorm2d` with `num_groups` splits.

    In training each group of `batch / num_groups` samples is normalized with its own batch
    statistics, and the moving statistics move towards the mean of the groups' statistics
    (PyTorch momentum 0.1 = `1 - momentum` here). In inference the moving statistics are used.
    Under a distribution strategy each replica normalizes its own batch; the moving statistics
    are averaged across replicas on every update.
    """

    def __init__(
        self,
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        num_groups: int = 1,
        gamma_initializer="ones",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.momentum = momentum
        self.epsilon = epsilon
        self.num_groups = num_groups
        self.gamma_initializer = keras.initializers.get(gamma_initializer)

    def build(self, input_shape):
        channels = (input_shape[-1],)
        self.gamma = self.add_weight(shape=channels, initializer=self.gamma_initializer, name="gamma")
        self.beta = self.add_weight(shape=channels, initializer="zeros", name="beta")
        # Statistics stay float32 under mixed precision; "mean" keeps replicas identical.
        stat = dict(shape=channels, trainable=False, autocast=False, aggregation="mean")
        self.moving_mean = self.add_weight(initializer="zeros", name="moving_mean", **stat)
        self.moving_variance = self.add_weight(initializer="ones", name="moving_variance", **stat)

    def call(self, inputs, training=False):
        if not training:
            dtype = tf.float64 if inputs.dtype == tf.float64 else tf.float32
            scale = tf.cast(self.gamma, dtype) * tf.math.rsqrt(tf.cast(self.moving_variance, dtype) + self.epsilon)
            shift = tf.cast(self.beta, dtype) - tf.cast(self.moving_mean, dtype) * scale
            return tf.cast(tf.cast(inputs, dtype) * scale + shift, inputs.dtype)
        groups, channels = self.num_groups, inputs.shape[-1]
        grouped = self._grouped_4d(inputs)
        # The fused kernel has no float64: tests run the same math with plain ops.
        normalize = self._normalize_plain if inputs.dtype == tf.float64 else self._normalize_fused
        out, mean, var = normalize(grouped, *(tf.tile(w, [groups]) for w in (self.gamma, self.beta)))
        if groups > 1:  # back from [N / G, S, 1, G * C]: the inverse of _grouped_4d
            out = tf.transpose(tf.reshape(out, [tf.shape(grouped)[0], -1, groups, channels]), [0, 2, 1, 3])
        out = tf.reshape(out, tf.shape(inputs))
        # Moving statistics move towards the mean over the groups (PyTorch's unbiased variance).
        m = self.momentum
        for moving, batch in ((self.moving_mean, mean), (self.moving_variance, var)):
            group_average = tf.reduce_mean(tf.reshape(batch, [groups, channels]), axis=0)
            moving.assign(m * moving + (1.0 - m) * tf.cast(group_average, moving.dtype))
        return out

    def _grouped_4d(self, x):
        """[N, ..., C] -> [N / G, S, 1, G * C], S the spatial size: group g (samples g, g + G, g + 2G,
        ... as the official SplitBatchNorm's `x.view(-1, C * G, H, W)` interleaves them) becomes
        channels g*C .. g*C + C - 1 of one plain BatchNorm."""
        groups, channels = self.num_groups, x.shape[-1]
        x = tf.reshape(x, [-1, groups, tf.reduce_prod(tf.shape(x)[1:-1]), channels])
        if groups > 1:
            x = tf.transpose(x, [0, 2, 1, 3])
        return tf.reshape(x, [tf.shape(x)[0], -1, 1, groups * channels])

    def _normalize_fused(self, x, gamma, beta):
        """One fused kernel (oneDNN / cuDNN / XLA) over all groups at once; returns (output, per
        channel batch mean, unbiased batch variance). In training FusedBatchNorm normalizes with
        the biased variance and returns the unbiased one, exactly PyTorch's rule for running_var."""
        return tf.compat.v1.nn.fused_batch_norm(
            x, tf.cast(gamma, tf.float32), tf.cast(beta, tf.float32), epsilon=self.epsilon, data_format="NHWC",
            is_training=True,
        )  # fmt: skip

    def _normalize_plain(self, x, gamma, beta):
        """_normalize_fused with plain ops, in x's dtype (float64 for exactness tests)."""
        mean, var = tf.nn.moments(x, axes=[0, 1, 2])
        out = (x - mean) * tf.math.rsqrt(var + self.epsilon) * tf.cast(gamma, x.dtype) + tf.cast(beta, x.dtype)
        count = tf.cast(tf.shape(x)[0] * tf.shape(x)[1], x.dtype)
        return out, mean, var * count / (count - 1.0)

    def get_config(self):
        config = super().get_config()
        config.update(
            momentum=self.momentum,
            epsilon=self.epsilon,
            num_groups=self.num_groups,
            gamma_initializer=keras.initializers.serialize(self.gamma_initializer),
        )
        return config
