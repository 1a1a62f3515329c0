"""Stable public path of the ResNet backbones (`moco_tf.resnet.resnet50`, ...); the code lives in
`moco_tf.models.resnet`."""

from moco_tf.models.resnet import *  # noqa: F403
