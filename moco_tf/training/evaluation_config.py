"""The configs of the evaluation runs: LinearConfig (`python -m moco_tf.lincls`, the linear
classification protocol, lincls_config.json) and FinetuneConfig (`python -m moco_tf.finetune`,
finetune_config.json). One flat section each, declared as moco_tf.training.config's sections are
(moco_tf.training.settings), all of it recipe unless marked operational.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

from moco_tf.data.sources import MIN_IMAGE_SIZE
from moco_tf.training import recipes, settings
from moco_tf.training.config import (
    DATA_DIR_HELP,
    DATASET_HELP,
    FORMAT_VERSION,
    PRETRAINED_HELP,
    STRICT_HELP,
    backbone_spec,
    check_format_version,
    check_memory,
    check_outside_data,
    check_types,
    given_flags,
    json_values,
    section_from_dict,
    section_to_dict,
    typed_flags,
)
from moco_tf.training.settings import (
    MOMENTUM,
    NON_NEGATIVE,
    NON_NEGATIVE_FLOAT,
    POSITIVE,
    POSITIVE_EPOCHS,
    POSITIVE_FLOAT,
    POSITIVE_OR_UNSET,
    SEED,
    SHARE,
    ConfigError,
    setting,
)


@dataclasses.dataclass
class _EvaluationRecipe:
    """What the lincls and finetune configs share: one flat section, all of it recipe unless marked
    operational, written to and read from the model_dir's JSON file, read from the flags; and the
    settings both have."""

    RECIPE: ClassVar[bool] = True
    pretrained: str | None = setting(None, PRETRAINED_HELP + " Recorded absolute.")
    dataset: str | None = setting(None, DATASET_HELP)
    image_size: int | None = setting(None, "Crop size; default: the encoder's (32 with the CIFAR stem, else 224).",
                                     check=POSITIVE)
    batch_size: int = setting(256, "Global batch size, over all replicas and workers.", check=POSITIVE)
    sgd_momentum: float = setting(0.9, "SGD momentum (the official --momentum).", check=MOMENTUM)
    weight_decay: float = setting(0.0, "SGD weight decay, PyTorch style (both protocols: none).",
                                  check=NON_NEGATIVE_FLOAT)
    seed: int | None = setting(
        None, "Seed of the new head's initialisation, the data order and augmentation (each epoch's of (seed, "
        "epoch)): with it a run stopped and resumed ends as an uninterrupted one.", check=SEED,
    )
    data_dir: str | None = setting(None, DATA_DIR_HELP, recipe=False)
    strict_data: bool = setting(False, STRICT_HELP, recipe=False)
    limit_val: int = setting(0, "Use only N val images, evenly spaced (quick checks); 0: all.", check=NON_NEGATIVE,
                             recipe=False)
    model_dir: str | None = setting(
        None, "Checkpoints, logs and results of this run; a rerun resumes from it.", recipe=False
    )
    unrecorded: frozenset[str] = dataclasses.field(default=frozenset(), compare=False, repr=False)

    @classmethod
    def recipe(cls, name: str) -> Any:
        """A named recipe of moco_tf.training.recipes (lincls_imagenet, finetune_cifar10_1pct, ...)."""
        return cls().replace(**recipes.settings(cls, name))

    def replace(self, **changes: Any) -> Any:
        """A copy with settings changed by flag name; values are checked by validate()."""
        hints = typing.get_type_hints(type(self))
        names = {f.name for f in settings.settings_of(type(self))}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]!r}; settings: {', '.join(sorted(names))}")
        return dataclasses.replace(self, **{k: settings.typed(k, v, hints[k], flags=True) for k, v in changes.items()})

    def leaves(self) -> list[settings.Leaf]:
        return list(settings.leaves(self))

    def declarations(self) -> dict[str, settings.Leaf]:
        return {leaf.name: leaf for leaf in self.leaves()}

    def flat(self) -> dict[str, Any]:
        return {leaf.name: leaf.value for leaf in self.leaves()}

    def recipe_settings(self) -> dict[str, Any]:
        return {leaf.name: leaf.value for leaf in self.leaves() if leaf.recipe}

    def _validate_common(self) -> dict[str, Any]:
        check_types([self])
        for leaf in self.leaves():
            settings.check_leaf(leaf)
        values = self.flat()
        if values["image_size"] is not None and values["image_size"] < MIN_IMAGE_SIZE:
            raise ConfigError(f"--image_size {values['image_size']} is too small (at least {MIN_IMAGE_SIZE})")
        check_memory(values["image_size"], values["batch_size"], arch=values.get("arch"), width=values.get("width"))
        check_outside_data(values)
        return values

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, **section_to_dict(self, self.unrecorded)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Any:
        """From a parsed config file; only moco_tf's format (its format_version) is read."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"a config must be a JSON object, got {type(values).__name__}")
        check_format_version(values)
        given = {k: v for k, v in values.items() if k != "format_version"}
        unrecorded: set[str] = set()
        config = section_from_dict(cls, given, None, unrecorded)
        return dataclasses.replace(config, unrecorded=frozenset(unrecorded))

    @classmethod
    def from_json(cls, text: str) -> Any:
        return cls.from_dict(json_values(text))

    @classmethod
    def from_flags(cls, flag_values: Any) -> Any:
        """From absl FlagValues (the flags the user gave, over --recipe's values or the defaults), or a
        mapping of flag name -> value (every entry given; "recipe" names the base)."""
        values = given_flags(flag_values)
        name = values.pop("recipe", None)
        base = cls.recipe(name) if name else cls()
        return base.replace(**typed_flags(values, base.declarations()))


@dataclasses.dataclass
class LinearConfig(_EvaluationRecipe):
    """Linear classification on a frozen encoder; defaults: the official protocol (main_lincls.py).
    Everything that changes the classifier's training is recipe: a rerun in the same model_dir
    resumes only with the same."""

    RUN_KIND: ClassVar[str] = "another linear classifier run"
    epochs: int = setting(100, "Training epochs (official: 100).", check=POSITIVE)
    lr: float = setting(
        30.0, "SGD learning rate per 256 images, scaled linearly with --batch_size (used: lr x batch_size / 256); "
        "at batch 256 the official --lr (30).", check=POSITIVE_FLOAT,
    )
    milestones: tuple[int, ...] = setting(
        (60, 80), "Epochs at which the learning rate drops x0.1 (official --schedule: 60,80).", check=POSITIVE_EPOCHS
    )
    precompute_features: bool = setting(
        False, "Extract features once (eval transform, no augmentation) and train on them: fast on a CPU, but NOT "
        "the official protocol.",
    )
    limit_train: int = setting(0, "Use only N train images, evenly spaced (quick checks); 0: all.", check=NON_NEGATIVE,
                               recipe=False)

    def validate(self) -> None:
        self._validate_common()


@dataclasses.dataclass
class FinetuneConfig(_EvaluationRecipe):
    """Fine-tuning the whole encoder and a new head on a fraction of the labels; defaults: the
    SimCLR v1 semi-supervised recipe (`moco_tf.evaluation.finetune`). Recipe as for LinearConfig:
    a rerun in the same model_dir resumes only with the same. arch / width / cifar_stem are the
    backbone's (read from --pretrained, or given with --random_init)."""

    RUN_KIND: ClassVar[str] = "another fine-tuning run"
    random_init: bool = setting(
        False, "Train from randomly initialised weights instead of --pretrained (the baseline)."
    )
    arch: str = setting("resnet50", "With --random_init: the backbone (--pretrained gives its own).")
    width: int = setting(64, "With --random_init: the ResNet's base channels (64: standard).", check=POSITIVE)
    cifar_stem: bool = setting(False, "With --random_init: 3x3 stride-1 first conv, no max-pool (32 px images).")
    label_fraction: float = setting(
        1.0, "Fraction of the train split's labels to train on, in (0, 1]: a class-balanced subset fixed by "
        "--subset_seed; imagenet2012 at 0.01 / 0.1 uses TFDS's imagenet2012_subset/1pct / 10pct (SimCLR's lists).",
        check=SHARE,
    )
    subset_seed: int = setting(
        0, "Seed of the class-balanced label subset (not used for TFDS's lists).", check=SEED
    )
    epochs: int | None = setting(
        None, "Training epochs; default: the recipe's for --label_fraction (60 at 0.01, 30 at 0.1).",
        check=POSITIVE_OR_UNSET,
    )
    lr: float = setting(
        0.05, "Learning rate per 256 images, scaled linearly with --batch_size (used: lr x batch_size / 256; "
        "SimCLR: 0.05, i.e. 0.8 at batch 4096); decayed by a cosine over the epochs.", check=POSITIVE_FLOAT,
    )
    nesterov: bool = setting(True, "Nesterov momentum (SimCLR's fine-tuning).")
    eval_every: int = setting(
        1, "Top-1 / top-5 on the eval split every N epochs (and after the last).", check=POSITIVE, recipe=False
    )
    export_dir: str | None = setting(
        None, "At the end, write the fine-tuned backbone + head here as a TF-Hub SavedModel.", recipe=False
    )
    overwrite_export: bool = setting(False, "Let --export_dir replace an existing moco_tf export.", recipe=False)

    def validate(self) -> None:
        self._validate_common()
        if self.random_init == bool(self.pretrained):
            raise ConfigError("give either --pretrained=PATH or --random_init (with --arch, --width, --cifar_stem)")
        if self.random_init:
            backbone_spec({"arch": self.arch, "width": self.width, "cifar_stem": self.cifar_stem}, flags=True)


