"""InfoNCE, the MoCo contrastive loss."""

from __future__ import annotations

import tensorflow as tf


def info_nce(
    q: tf.Tensor, k: tf.Tensor, queue: tf.Tensor, temperature: float
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """InfoNCE of L2-normalized queries q [N, D] against their keys k [N, D] and the queue [K, D].

    Logits are `[l_pos, l_neg] / T` with the positive at index 0, as the official code builds
    them; cross-entropy with label 0, averaged over the batch. Computed in float32 (float64 for float64 inputs).

    Returns (loss, l_pos [N], l_neg [N, K]); l_pos and l_neg are cosine similarities (before
    the temperature), for logging.
    """
    dtype = tf.float64 if q.dtype == tf.float64 else tf.float32
    q, k, queue = tf.cast(q, dtype), tf.cast(k, dtype), tf.cast(queue, dtype)
    l_pos = tf.reduce_sum(q * k, axis=1)
    l_neg = tf.matmul(q, queue, transpose_b=True)
    logits = tf.concat([l_pos[:, None], l_neg], axis=1) / temperature
    labels = tf.zeros(tf.shape(q)[:1], dtype=tf.int32)
    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))
    return loss, l_pos, l_neg
