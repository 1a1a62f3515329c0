"""A backbone as evaluation runs it: frozen, in inference mode, compiled once.

BatchNorm uses, and never updates, its moving statistics. One traced function is kept per
backbone (`inference_fn`), so evaluating the same backbone again, every few epochs during
training for instance, traces nothing new (a new tf.function per call made TensorFlow print
its retracing warning).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import keras
import numpy as np
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
        return tf.function(lambda images: model()(images, training=False), reduce_retracing=True)
    return tf.function(backbone, reduce_retracing=True)


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
        self._fn = tf.function(lambda images: model(images, training=False), reduce_retracing=True)

    def __call__(self, images) -> tf.Tensor:
        return self._fn(images)

    @property
    def variables(self) -> list:
        return list(self.model.weights)  # BN moving statistics included

    def snapshot(self) -> dict[str, np.ndarray]:
        """A copy of every backbone variable by path, to check later that nothing changed."""
        return {v.path: np.array(v) for v in self.model.weights}
