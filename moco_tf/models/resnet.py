"""ResNet v1.5 backbones in torchvision's exact layout, so official PyTorch weights load one to one.

- Bottleneck stride on the 3x3 conv (v1.5), 1x1 stride-2 projection shortcut ("downsample").
- No conv bias; BatchNorm with PyTorch's eps 1e-5 and momentum 0.1 (`moco_tf.models.batchnorm`).
- Stride-2 convs and the max-pool pad symmetrically, then run "valid": TF's "same" pads
  (0, 1) for even inputs where PyTorch pads (1, 1), which would shift every feature map.
- Layer names follow torchvision's state_dict keys: conv1, bn1, layer1.0.conv1, layer1.0.bn1,
  layer2.0.downsample.0, layer2.0.downsample.1, ...
- Initialisation as torchvision: convs Kaiming-normal (fan_out, ReLU), BN gamma 1 and beta 0.

A backbone maps images [N, H, W, 3] (normalized float) to pooled features [N, 512 or 2048]
(at the standard width 64; narrower `width` scales every stage, for CPU-budget experiments).
"""

from __future__ import annotations

import keras

from moco_tf.models.batchnorm import BatchNorm

# depth -> (block kind, blocks per stage)
SPECS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
ARCHS = tuple(f"resnet{depth}" for depth in SPECS)
_EXPANSION = {"basic": 1, "bottleneck": 4}


STANDARD_WIDTH = 64


def feature_dim(arch: str, width: int = STANDARD_WIDTH) -> int:
    """Width of the pooled features: 512 for resnet18/34, 2048 for resnet50 and deeper (at width 64)."""
    kind, _ = SPECS[_depth(arch)]
    return 8 * width * _EXPANSION[kind]


def _depth(arch: str) -> int:
    depth = int(arch.removeprefix("resnet")) if arch.startswith("resnet") else None
    if depth not in SPECS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    return depth


@keras.saving.register_keras_serializable(package="moco_tf")
class SubsampledConv2D(keras.layers.Conv2D):
    """A 1x1 Conv2D with strides s computed as x[:, ::s, ::s] convolved at stride 1: the same
    numbers (a 1x1 kernel reads only those pixels; "same" pads nothing there), the same layer,
    variables and config. Why: on CPU, TF 2.21's oneDNN gradient of a 1x1 stride-2 conv
    (Conv2DBackpropFilter) corrupts the heap at some shapes ("double free or corruption", or a
    segfault): seen with 4 or 8 input channels on 16-64 pixel maps at any odd batch size, so a
    fine-tuning epoch ending in an odd partial batch (73 images in batches of 16) killed the process."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if max(self.kernel_size) != 1 or max(self.dilation_rate) != 1:
            raise ValueError(f"{type(self).__name__} is for 1x1 undilated kernels, not {self.kernel_size}")

    def convolution_op(self, inputs, kernel):
        sh, sw = self.strides
        if self.data_format == "channels_first":
            inputs = inputs[:, :, ::sh, ::sw]
        else:
            inputs = inputs[:, ::sh, ::sw, :]
        return keras.ops.conv(inputs, kernel, strides=1, padding="valid", data_format=self.data_format)


def _conv(filters: int, kernel: int, stride: int, name: str):
    """Conv without bias; padding is explicit and symmetric as in PyTorch."""
    layers = []
    pad = kernel // 2
    if stride > 1 and pad:
        layers.append(keras.layers.ZeroPadding2D(pad, name=f"{name}.pad"))
        padding = "valid"
    else:
        padding = "same"  # stride 1, odd kernel: "same" is symmetric
    # A 1x1 strided conv (the projection shortcut) as subsample + stride-1 conv: see SubsampledConv2D.
    conv_class = SubsampledConv2D if kernel == 1 and stride > 1 else keras.layers.Conv2D
    layers.append(
        conv_class(
            filters,
            kernel,
            strides=stride,
            padding=padding,
            use_bias=False,
            kernel_initializer=keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal"),
            name=name,
        )
    )

    def apply(x):
        for layer in layers:
            x = layer(x)
        return x

    return apply


def _bn(name: str, bn_groups: int):
    return BatchNorm(num_groups=bn_groups, name=name)


def _basic_block(x, planes: int, stride: int, name: str, bn_groups: int):
    shortcut = x
    out = _conv(planes, 3, stride, f"{name}.conv1")(x)
    out = keras.layers.ReLU()(_bn(f"{name}.bn1", bn_groups)(out))
    out = _conv(planes, 3, 1, f"{name}.conv2")(out)
    out = _bn(f"{name}.bn2", bn_groups)(out)
    if stride != 1 or x.shape[-1] != planes:
        shortcut = _conv(planes, 1, stride, f"{name}.downsample.0")(x)
        shortcut = _bn(f"{name}.downsample.1", bn_groups)(shortcut)
    return keras.layers.ReLU(name=f"{name}.out")(keras.layers.Add()([out, shortcut]))


def _bottleneck_block(x, planes: int, stride: int, name: str, bn_groups: int):
    shortcut = x
    out = _conv(planes, 1, 1, f"{name}.conv1")(x)
    out = keras.layers.ReLU()(_bn(f"{name}.bn1", bn_groups)(out))
    out = _conv(planes, 3, stride, f"{name}.conv2")(out)  # v1.5: stride on the 3x3
    out = keras.layers.ReLU()(_bn(f"{name}.bn2", bn_groups)(out))
    out = _conv(planes * 4, 1, 1, f"{name}.conv3")(out)
    out = _bn(f"{name}.bn3", bn_groups)(out)
    if stride != 1 or x.shape[-1] != planes * 4:
        shortcut = _conv(planes * 4, 1, stride, f"{name}.downsample.0")(x)
        shortcut = _bn(f"{name}.downsample.1", bn_groups)(shortcut)
    return keras.layers.ReLU(name=f"{name}.out")(keras.layers.Add()([out, shortcut]))


def resnet(
    arch: str = "resnet50",
    cifar_stem: bool = False,
    bn_groups: int = 1,
    image_size: int | None = None,
    width: int = STANDARD_WIDTH,
    name: str | None = None,
) -> keras.Model:
    """A ResNet backbone: images [N, H, W, 3] -> global-average-pooled features [N, C].

    cifar_stem: 3x3 stride-1 first conv and no max-pool (the official MoCo CIFAR demo).
    bn_groups: BatchNorm statistics per group of N / bn_groups samples in training.
    image_size: fixes H = W in the input signature (any size when None).
    width: channels of the stem and the first stage (stages: width, 2x, 4x, 8x); torchvision's is 64.
    """
    if width < 1:
        raise ValueError(f"width must be a positive number of channels, got {width}")
    kind, blocks = SPECS[_depth(arch)]
    block = _basic_block if kind == "basic" else _bottleneck_block
    inputs = keras.Input((image_size, image_size, 3), name="images")
    if cifar_stem:
        x = _conv(width, 3, 1, "conv1")(inputs)
        x = keras.layers.ReLU()(_bn("bn1", bn_groups)(x))
    else:
        x = _conv(width, 7, 2, "conv1")(inputs)
        x = keras.layers.ReLU()(_bn("bn1", bn_groups)(x))
        # Zero padding equals PyTorch's -inf padding here: the input is post-ReLU (>= 0).
        x = keras.layers.ZeroPadding2D(1, name="maxpool.pad")(x)
        x = keras.layers.MaxPooling2D(3, strides=2, name="maxpool")(x)
    stage_planes = (width, 2 * width, 4 * width, 8 * width)
    for stage, (planes, count) in enumerate(zip(stage_planes, blocks, strict=True), start=1):
        for index in range(count):
            stride = 2 if stage > 1 and index == 0 else 1
            x = block(x, planes, stride, f"layer{stage}.{index}", bn_groups)
    features = keras.layers.GlobalAveragePooling2D(name="avgpool")(x)
    return keras.Model(inputs, features, name=name or arch)


def resnet18(**kwargs) -> keras.Model:
    return resnet("resnet18", **kwargs)


def resnet34(**kwargs) -> keras.Model:
    return resnet("resnet34", **kwargs)


def resnet50(**kwargs) -> keras.Model:
    return resnet("resnet50", **kwargs)


def resnet101(**kwargs) -> keras.Model:
    return resnet("resnet101", **kwargs)


def resnet152(**kwargs) -> keras.Model:
    return resnet("resnet152", **kwargs)
