"""Named recipes: each one the settings of a published (or this project's measured) run, by flag
name, read by `PretrainConfig.recipe(name)` (LinearConfig / FinetuneConfig likewise), by the
command lines' `--recipe=NAME` (configs/*.flags name one), and by `convert` (the official
recipe a PyTorch checkpoint was trained with).

A pretraining recipe states every recipe setting, so it does not depend on the defaults.
"""

from __future__ import annotations

from typing import Any

from moco_tf.training.settings import ConfigError

# He et al. 2019 (arXiv:1911.05722), facebookresearch/moco main_moco.py's defaults. Published:
# 60.6% linear top-1 (ResNet-50, 200 epochs).
_MOCO_V1_IMAGENET = {
    "dataset": "imagenet2012", "image_size": 224, "arch": "resnet50", "width": 64, "cifar_stem": False,
    "dim": 128, "mlp": False, "queue_size": 65536, "moco_momentum": 0.999, "temperature": 0.07,
    "symmetric": False, "shuffle_bn": True, "bn_groups": 1, "aug": "v1", "crop_min_scale": 0.2, "flip": True,
    "blur": True, "epochs": 200, "batch_size": 256, "lr": 0.03, "schedule": "step", "milestones": (120, 160),
    "warmup_epochs": 0, "weight_decay": 1e-4, "sgd_momentum": 0.9, "seed": None,
    "knn_every": 0, "checkpoint_every": 5000,
}
# Chen et al. 2020 (arXiv:2003.04297): main_moco.py --mlp --moco-t 0.2 --aug-plus --cos.
# Published: 67.5% linear top-1 at 200 epochs, 71.1% at 800 (ResNet-50).
_MOCO_V2_IMAGENET = {**_MOCO_V1_IMAGENET, "mlp": True, "temperature": 0.2, "aug": "v2", "schedule": "cosine"}

PRETRAIN: dict[str, dict[str, Any]] = {
    "moco_v1_imagenet": _MOCO_V1_IMAGENET,
    "moco_v2_imagenet": _MOCO_V2_IMAGENET,
    "moco_v2_800ep": {**_MOCO_V2_IMAGENET, "epochs": 800},
    # The official CIFAR-10 demo (facebookresearch/moco colab/moco_cifar10_demo.ipynb): ResNet-18 with
    # the CIFAR stem, lr 0.06 at batch 512, wd 5e-4, K 4096, m 0.99, T 0.1, SplitBN with 8 groups,
    # cosine, 200 epochs, kNN monitor k=200 t=0.1. Published by the demo: 82.6% kNN top-1 (85.3%
    # symmetric). The demo's augmentation is v2-like without blur; "v2" here keeps blur.
    "cifar10_v2": {
        **_MOCO_V2_IMAGENET, "mlp": False, "dataset": "cifar10", "image_size": 32, "arch": "resnet18",
        "cifar_stem": True,
        "queue_size": 4096, "moco_momentum": 0.99, "temperature": 0.1, "bn_groups": 8, "batch_size": 512,
        "weight_decay": 5e-4, "knn_every": 10, "checkpoint_every": 1000,
    },
    # MoCo v2 on the embedded digits (1,438 train / 359 held out, 8x8 upscaled to 32x32): a narrow
    # resnet18 (width 16, ~10x cheaper steps), queue 256 (18% of the training digits, so fewer
    # negatives are older keys of a query's own image), batch 64 (22 steps an epoch), crops of at
    # least half a digit, no flips (a mirrored 2 is no digit), no blur (a 1-pixel kernel at 32 px).
    # PretrainConfig()'s defaults are this recipe.
    "quickstart": {
        **_MOCO_V2_IMAGENET, "dataset": "digits", "image_size": 32, "arch": "resnet18", "width": 16,
        "cifar_stem": True, "queue_size": 256, "moco_momentum": 0.99, "temperature": 0.1, "bn_groups": 4,
        "crop_min_scale": 0.5, "flip": False, "blur": False, "epochs": 15, "batch_size": 64, "lr": 0.12,
        "weight_decay": 5e-4, "knn_every": 5, "checkpoint_every": 100,
    },
}

# The linear classification protocol of the MoCo papers (main_lincls.py): frozen backbone in
# inference mode, fc N(0, 0.01), SGD lr 30 per 256 images, momentum 0.9, no weight decay, batch
# 256, 100 epochs, x0.1 at 60 and 80. Published: v1 60.6%, v2 200ep 67.5%, v2 800ep 71.1% top-1.
_LINCLS = {"batch_size": 256, "epochs": 100, "lr": 30.0, "sgd_momentum": 0.9, "weight_decay": 0.0,
           "milestones": (60, 80)}
LINEAR: dict[str, dict[str, Any]] = {
    "lincls_imagenet": {**_LINCLS, "dataset": "imagenet2012", "image_size": 224},
    "lincls_cifar10": {**_LINCLS, "dataset": "cifar10", "image_size": 32},
}

# SimCLR v1's semi-supervised fine-tuning (Chen et al. 2020, arXiv:2002.05709, appendix B.5): the
# whole backbone and a new linear head, Nesterov SGD 0.9, lr 0.05 per 256 images, cosine, no weight
# decay; 60 epochs at 1% of the labels, 30 at 10%. Published (ResNet-50): 48.3% / 65.6% top-1.
_SIMCLR_FINETUNE = {"lr": 0.05, "sgd_momentum": 0.9, "nesterov": True, "weight_decay": 0.0}
FINETUNE: dict[str, dict[str, Any]] = {
    "finetune_imagenet_1pct": {**_SIMCLR_FINETUNE, "dataset": "imagenet2012", "image_size": 224,
                               "label_fraction": 0.01, "batch_size": 4096, "epochs": 60},
    "finetune_imagenet_10pct": {**_SIMCLR_FINETUNE, "dataset": "imagenet2012", "image_size": 224,
                                "label_fraction": 0.1, "batch_size": 4096, "epochs": 30},
    # At 32x32 and batch 256 (a CPU/GPU budget instead of SimCLR's 4096); 60 epochs at 1% (the default).
    "finetune_cifar10_1pct": {**_SIMCLR_FINETUNE, "dataset": "cifar10", "image_size": 32, "label_fraction": 0.01,
                              "subset_seed": 0, "batch_size": 256},
}

_REGISTRY = {"PretrainConfig": PRETRAIN, "LinearConfig": LINEAR, "FinetuneConfig": FINETUNE}


def names(config_type: type) -> list[str]:
    """The recipes of one config class, sorted."""
    return sorted(_REGISTRY[config_type.__name__])


def settings(config_type: type, name: str) -> dict[str, Any]:
    """The settings of recipe `name` for `config_type`; a ConfigError naming the known ones."""
    table = _REGISTRY[config_type.__name__]
    if name not in table:
        raise ConfigError(f"--recipe must be one of {', '.join(sorted(table))}, got {name!r}")
    return dict(table[name])
