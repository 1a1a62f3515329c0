"""Stable public path of the PyTorch-style SGD (`moco_tf.optimizers.SGD`); the code lives in
`moco_tf.training.optimizers`."""

from moco_tf.training.optimizers import *  # noqa: F403
