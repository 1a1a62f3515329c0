"""A backbone as evaluation runs it: frozen, in inference mode, compiled once.

BatchNorm uses, and never updates, its moving statistics. One traced function is kept per
backbone (`inference_fn`), so evaluating the same backbone again, every few epochs during
training for instance, traces nothing new (a new tf.function per call made TensorFlow print
its retracing warning).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

# One compiled function per backbone, forgotten with the backbone.
_compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def inference_fn(backbone: keras.Model | Callable) -> Callable[[tf.Tensor], tf.Tensor]:
    """A compiled images -> features function of `backbone`, the same one on every call; a Keras
    model runs in inference mode (BN moving statistics, never updated)."""
    if isinstance(backbone, FrozenBackbone):
        return backbone  # compiled already
    try:
        return _compiled[backbone]
    except KeyError:
        pass
    except TypeError:  # not weakly referenceable: compile it for this call only
        return _compile(backbone)
    fn = _compile(backbone)
    _compiled[backbone] = fn
    return fn


def _compile(backbone: keras.Model | Callable) -> Callable[[tf.Tensor], tf.Tensor]:
    if isinstance(backbone, keras.Model):
        # A weak reference: the cached function must not keep its own key (the model) alive.
        model = weakref.ref(backbone)
        return tf.function(lambda images: _float32(model()(images, training=False)), reduce_retracing=True)
    return tf.function(lambda images: _float32(backbone(images)), reduce_retracing=True)


def _float32(features: tf.Tensor) -> tf.Tensor:
    # A mixed-precision backbone computes in float16 / bfloat16; similarities and logits need float32.
    return tf.cast(features, tf.float32)


# One compiled distributed step per (backbone, strategy, with images), forgotten with the backbone.
_distributed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def distributed_fn(
    backbone: keras.Model | Callable, strategy: tf.distribute.Strategy, with_images: bool = False
) -> Callable[[Any], tuple[tf.Tensor, ...]]:
    """A compiled function of one distributed (images, labels) batch: each replica embeds its
    shard, and (features [B, D] float32, labels [B]), with `with_images` also images, come back
    gathered from every replica and worker in replica order. The same function on every call."""
    key = (id(strategy), with_images)
    try:
        per_backbone = _distributed.setdefault(backbone, {})
    except TypeError:  # not weakly referenceable
        per_backbone = {}
    if key in per_backbone and per_backbone[key][0] is strategy:
        return per_backbone[key][1]
    embed = inference_fn(backbone)

    def replica(images, labels):
        return (embed(images), labels, images) if with_images else (embed(images), labels)

    @tf.function(reduce_retracing=True)
    def step(batch):
        outputs = strategy.run(replica, args=batch)
        return tuple(strategy.gather(x, axis=0) for x in outputs)

    per_backbone[key] = (strategy, step)
    return step


def is_distributed(strategy: tf.distribute.Strategy | None) -> bool:
    """Whether `strategy` spreads work over several replicas or workers (else the local path)."""
    if strategy is None:
        return False
    # A TPU runs only what `strategy.run` gives it, even with one replica.
    kinds = (tf.distribute.MultiWorkerMirroredStrategy, tf.distribute.TPUStrategy)
    return strategy.num_replicas_in_sync > 1 or isinstance(strategy, kinds)


def replicate(
    backbone: FrozenBackbone, build: Callable[[], keras.Model], strategy: tf.distribute.Strategy
) -> FrozenBackbone:
    """`backbone`'s weights in a model from `build()` made in `strategy.scope()`: variables on
    every replica, layers in the global dtype policy (mixed precision computes in its dtype)."""
    with strategy.scope():
        model = build()
        model.set_weights(backbone.model.get_weights())
    return FrozenBackbone(model)


class FrozenBackbone:
    """images (ImageNet-normalised float [N, H, W, 3]) -> pooled features [N, D], always in
    inference mode: BatchNorm uses, and never updates, its moving statistics.

    `model` is the Keras backbone (for the linear protocol's weight check); it is marked
    non-trainable, so no optimizer ever sees its variables.
    """

    def __init__(self, model: keras.Model):
        self.model = model
        model.trainable = False
        self.feature_dim = int(model.output.shape[-1])
        self._fn = tf.function(lambda images: _float32(model(images, training=False)), reduce_retracing=True)

    def __call__(self, images) -> tf.Tensor:
        return self._fn(images)

    @property
    def variables(self) -> list:
        return list(self.model.weights)  # BN moving statistics included
