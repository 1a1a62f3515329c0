"""One backbone spec: which network an encoder is (arch, width, stem) and the facts that follow
from it (default image size, feature dim, input normalisation), plus the registry of
architectures. A new backbone is one `register_backbone` entry.

Model, export, pretrained loaders, convert and checkpoint pass a `BackboneSpec` around instead
of rebuilding `arch`, `width` and `cifar_stem` by hand; config.json and an export's
moco_config.json store it with `to_dict()` and read it back with `from_dict()`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import keras

from moco_tf.models import resnet

# torchvision's ImageNet statistics, which every MoCo encoder (and the official weights) expects:
# images in [0, 1] are normalised as (x - mean) / std.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The side an encoder is trained and evaluated at by default: CIFAR-size images with the CIFAR
# stem (no downsampling in the stem), ImageNet's 224 crops otherwise.
CIFAR_IMAGE_SIZE = 32
IMAGENET_IMAGE_SIZE = 224

# Dataset names are TFDS names, the ones --dataset takes: "imagenet2012", never "imagenet".
IMAGENET_DATASET = "imagenet2012"
CIFAR10_DATASET = "cifar10"

STANDARD_WIDTH = resnet.STANDARD_WIDTH  # torchvision's base channels, the ones official weights fit
# The widest ResNet a flag or a file may ask for (16x the standard; SimCLR's widest is 4x): a bound
# on what is built before any memory is spent, for --width and for the width recorded in a file.
MAX_WIDTH = 1024


def default_image_size(cifar_stem: bool) -> int:
    """32 with the CIFAR stem, else 224: the one place this rule is written."""
    return CIFAR_IMAGE_SIZE if cifar_stem else IMAGENET_IMAGE_SIZE


def official_dataset(cifar_stem: bool) -> str:
    """What official MoCo weights of this stem were pretrained on: the CIFAR-10 demo or ImageNet.
    For weights that come without a recipe (converted PyTorch checkpoints)."""
    return CIFAR10_DATASET if cifar_stem else IMAGENET_DATASET


@dataclasses.dataclass(frozen=True)
class BackboneArch:
    """A registered architecture: how to build it and how wide its pooled features are.

    build(cifar_stem=, bn_groups=, image_size=, width=, name=) -> keras.Model mapping normalised
    images [N, H, W, 3] to pooled features [N, feature_dim(width)].
    """

    name: str
    build: Callable[..., keras.Model]
    feature_dim: Callable[[int], int]
    standard_width: int = STANDARD_WIDTH
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


BACKBONES: dict[str, BackboneArch] = {}


def register_backbone(
    name: str,
    build: Callable[..., keras.Model],
    feature_dim: Callable[[int], int],
    *,
    standard_width: int = STANDARD_WIDTH,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> BackboneArch:
    """Adds an architecture under `name` (the value of --arch); a name is registered once."""
    if name in BACKBONES:
        raise ValueError(f"backbone {name!r} is already registered")
    arch = BackboneArch(name, build, feature_dim, standard_width, tuple(mean), tuple(std))
    BACKBONES[name] = arch
    return arch


def get_backbone(name: str) -> BackboneArch:
    """The registered architecture `name`; a ValueError listing the known names otherwise."""
    try:
        return BACKBONES[name]
    except (KeyError, TypeError):  # TypeError: an unhashable value read from a JSON file
        raise ValueError(f"unknown arch {name!r}; choose one of {', '.join(BACKBONES)}") from None


def backbone_names() -> tuple[str, ...]:
    """Registered architecture names, in registration order (the choices of --arch)."""
    return tuple(BACKBONES)


# torchvision's ResNet v1.5 family (moco_tf.models.resnet), the backbones of MoCo v1/v2.
for _arch in resnet.ARCHS:
    register_backbone(
        _arch,
        functools.partial(resnet.resnet, _arch),
        functools.partial(resnet.feature_dim, _arch),
    )
del _arch


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """Which backbone an encoder is: everything needed to rebuild it and to feed it.

    arch: a registered name (resnet18/34/50/101/152).
    width: base channels (64 standard; stages width, 2x, 4x, 8x). Narrower only for CPU-budget
        experiments: official weights fit width 64 only.
    cifar_stem: 3x3 stride-1 first conv and no max-pool (the official CIFAR-10 demo).
    """

    arch: str = "resnet50"
    width: int = STANDARD_WIDTH
    cifar_stem: bool = False

    def __post_init__(self):
        get_backbone(self.arch)  # a ValueError naming the known archs
        if isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 1:
            raise ValueError(f"width must be a positive number of channels, got {self.width!r}")
        if self.width > MAX_WIDTH:  # checked before anything is built: 10**6 channels is an out-of-memory
            raise ValueError(f"width must be at most {MAX_WIDTH} channels ({MAX_WIDTH // 64}x the standard), "
                             f"got {self.width}")
        if not isinstance(self.cifar_stem, bool):
            raise ValueError(f"cifar_stem must be true or false, got {self.cifar_stem!r}")

    @property
    def feature_dim(self) -> int:
        """Width of the pooled features: 8 x width for basic blocks, 32 x width for bottlenecks."""
        return get_backbone(self.arch).feature_dim(self.width)

    @property
    def default_image_size(self) -> int:
        return default_image_size(self.cifar_stem)

    @property
    def mean(self) -> tuple[float, float, float]:
        """Per-channel mean the backbone's inputs are normalised with (images in [0, 1])."""
        return get_backbone(self.arch).mean

    @property
    def std(self) -> tuple[float, float, float]:
        return get_backbone(self.arch).std

    @property
    def is_standard_width(self) -> bool:
        return self.width == get_backbone(self.arch).standard_width

    @property
    def label(self) -> str:
        """For messages: "resnet50", or "resnet18 width 8" when not the standard width."""
        return self.arch if self.is_standard_width else f"{self.arch} width {self.width}"

    @property
    def tag(self) -> str:
        """For folder names: "resnet50", or "resnet18w8" when not the standard width."""
        return self.arch if self.is_standard_width else f"{self.arch}w{self.width}"

    def build(self, image_size: int | None = None, bn_groups: int = 1, name: str | None = None) -> keras.Model:
        """The backbone: normalised images [N, H, W, 3] -> pooled features [N, feature_dim].

        image_size fixes H = W in the input signature (static shapes for training; any size when
        None, as exports and evaluation use). bn_groups: BatchNorm statistics per group of
        N / bn_groups samples in training (shuffle BN on one device); in inference mode it never
        matters, so weights move freely between builds with different groups.
        """
        return get_backbone(self.arch).build(
            cifar_stem=self.cifar_stem, bn_groups=bn_groups, image_size=image_size, width=self.width, name=name
        )

    def to_dict(self) -> dict[str, Any]:
        """{"arch", "width", "cifar_stem"}: the keys config.json and moco_config.json store."""
        return {"arch": self.arch, "width": self.width, "cifar_stem": self.cifar_stem}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> BackboneSpec:
        """From a dict holding at least "arch" (other keys are ignored, so a whole config.json or
        moco_config.json may be passed). Files written before `width` / `cifar_stem` existed lack
        them (or hold null): they mean the standard width 64 and the ImageNet stem."""
        if values.get("arch") is None:
            raise ValueError("no arch recorded")
        width = values.get("width")
        cifar_stem = values.get("cifar_stem")
        return cls(
            arch=values["arch"],
            width=STANDARD_WIDTH if width is None else width,
            cifar_stem=False if cifar_stem is None else cifar_stem,
        )
