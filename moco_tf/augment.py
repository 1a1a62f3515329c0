"""Stable public path of the MoCo v1/v2 augmentations (`moco_tf.augment.augment_batch`, ...); the
code lives in `moco_tf.data.augment`."""

from moco_tf.data.augment import *  # noqa: F403
