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
        # float32 at least: float16 statistics lose too much; float64 stays float64.
        dtype = tf.float64 if inputs.dtype == tf.float64 else tf.float32
        x = tf.cast(inputs, dtype)
        gamma, beta = tf.cast(self.gamma, dtype), tf.cast(self.beta, dtype)
        moving_mean = tf.cast(self.moving_mean, dtype)
        moving_variance = tf.cast(self.moving_variance, dtype)
        if not training:
            scale = gamma * tf.math.rsqrt(moving_variance + self.epsilon)
            return tf.cast(x * scale + (beta - moving_mean * scale), inputs.dtype)

        # Group g holds samples g, g + G, g + 2G, ...: the official SplitBatchNorm's
        # `x.view(-1, C * G, H, W)` interleaves the batch this way.
        groups = self.num_groups
        shape = tf.shape(x)
        grouped = tf.reshape(x, tf.concat([[shape[0] // groups, groups], shape[1:]], 0))
        axes = [0] + list(range(2, len(x.shape)))  # all but the group and channel axes
        mean, var = tf.nn.moments(grouped, axes=axes, keepdims=True)
        out = (grouped - mean) * tf.math.rsqrt(var + self.epsilon) * gamma + beta
        out = tf.reshape(out, shape)

        # Moving statistics: unbiased variance as PyTorch, averaged over the groups.
        count = tf.cast(tf.size(grouped) // (groups * shape[-1]), dtype)
        batch_mean = tf.reduce_mean(tf.reshape(mean, [groups, -1]), axis=0)
        batch_var = tf.reduce_mean(tf.reshape(var, [groups, -1]), axis=0) * count / (count - 1.0)
        m = self.momentum
        self.moving_mean.assign(tf.cast(m * moving_mean + (1.0 - m) * batch_mean, self.moving_mean.dtype))
        self.moving_variance.assign(
            tf.cast(m * moving_variance + (1.0 - m) * batch_var, self.moving_variance.dtype)
        )
        return tf.cast(out, inputs.dtype)

    def get_config(self):
        config = super().get_config()
        config.update(
            momentum=self.momentum,
            epsilon=self.epsilon,
            num_groups=self.num_groups,
            gamma_initializer=keras.initializers.serialize(self.gamma_initializer),
        )
        return config
