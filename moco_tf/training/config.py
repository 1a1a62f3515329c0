"""The run configs: what a pretraining, linear-classification or fine-tuning run is, as typed
dataclasses whose fields are the settings (declared once, with help, bounds and role:
moco_tf.training.settings), validated once, written to and read from the model_dir's JSON file,
compared once on resume.

    PretrainConfig
      model:   ModelConfig    backbone (arch, width, cifar_stem), dim, mlp, queue_size, moco_momentum,
                              temperature, symmetric, shuffle_bn, bn_groups
      data:    DataConfig     dataset, image_size, aug, crop_min_scale, flip, blur; data_dir, strict_data
      optim:   OptimConfig    epochs, batch_size, lr, schedule, milestones, warmup_epochs,
                              weight_decay, sgd_momentum
      runtime: RuntimeConfig  seed (recipe); model_dir, strategy, checkpoints, logging, ... (operational)

`PretrainConfig()` is the quickstart: a small run that fits the embedded digits. Named recipes
(moco_tf.training.recipes): `PretrainConfig.recipe("moco_v2_imagenet")`; any setting by its flag
name: `config.replace(epochs=10, queue_size=4096)`.

config.json (structured; a key a file does not hold takes the default, is listed in `unrecorded`,
and is not compared on resume):

    {"format_version": 2, "moco_version": "v2",
     "model": {"backbone": {"arch": ..., "width": ..., "cifar_stem": ...}, "dim": ..., ...},
     "data": {...}, "optim": {...}, "runtime": {...}, "source": "..." (where the weights came from)}

LinearConfig and FinetuneConfig (moco_tf.training.evaluation_config) are the same for the linear
classification protocol and for fine-tuning.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from moco_tf.data.augment import ViewOptions
from moco_tf.data.sources import MIN_IMAGE_SIZE
from moco_tf.models import moco
from moco_tf.models.backbones import CIFAR_IMAGE_SIZE, IMAGENET_IMAGE_SIZE, BackboneSpec, get_backbone
from moco_tf.training import recipes, settings
from moco_tf.training.distribute import STRATEGIES
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
    shown,
)

FORMAT_VERSION = 2
Schedule = Literal["step", "cosine"]
Augmentation = Literal["v1", "v2"]
Precision = Literal["none", "bf16", "fp16"]
# --mixed_precision -> the Keras dtype policy it sets (bf16 on TPU; fp16 with loss scaling).
PRECISION_POLICIES: dict[str, str] = {"none": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
ColorStage = Literal["auto", "host", "device"]
Strategy = Literal[STRATEGIES]  # the choices of moco_tf.training.distribute

__all__ = [
    "ConfigError", "DataConfig", "ModelConfig", "OptimConfig", "PretrainConfig", "RunMismatchError", "RuntimeConfig",
    "check_memory", "check_outside_data", "check_recorded", "check_same_run",
]  # fmt: skip


class RunMismatchError(ConfigError):
    """model_dir holds a run of another recipe."""


# The backbone field holds three flags.
BACKBONE_PARTS = {
    "arch": ("Backbone architecture (torchvision ResNet v1.5 layout).", None),
    "width": (
        "Base channels of the ResNet (stages width, 2x, 4x, 8x; features 8x width, x4 with bottlenecks). 64 is the "
        "standard torchvision ResNet, the one official weights fit; smaller for CPU-budget runs.", POSITIVE,
    ),
    "cifar_stem": ("3x3 stride-1 first conv and no max-pool (small images, the official CIFAR demo).", None),
}
_SIZE_HELP = (f"Side of the square crops fed to the encoder; default: the backbone's ({CIFAR_IMAGE_SIZE} with "
              f"--cifar_stem, else {IMAGENET_IMAGE_SIZE}).")
STRICT_HELP = (
    "Read and decode every file of a --dataset=folder before starting and stop at the first broken one. "
    "Default: the folder is only listed (start-up independent of its size) and a file that does not decode is "
    "skipped and named in a summary line."
)
PRETRAINED_HELP = (
    "Encoder to start from: a moco_tf model_dir or checkpoint (DIR/checkpoints/ckpt-N), a TF-Hub export from "
    "moco_tf, or a PyTorch checkpoint (official MoCo .pth.tar, lincls or torchvision)."
)
DATASET_HELP = "digits (embedded), folder (with --data_dir), or a prepared TFDS name (cifar10, imagenet2012)."
DATA_DIR_HELP = "Image folder for --dataset=folder, or the TFDS data_dir (gs:// on TPU)."


# ----------------------------------------------------------------------------------------------
# pretraining (`python -m moco_tf.train`); defaults: the quickstart on the embedded digits


@dataclasses.dataclass
class ModelConfig:
    """The MoCo model. All recipe."""

    RECIPE: ClassVar[bool] = True
    backbone: BackboneSpec = setting(
        default_factory=lambda: BackboneSpec("resnet18", 16, True), parts=BACKBONE_PARTS,
        help="The encoder's backbone.",
    )
    dim: int = setting(128, "Projection dimension of queries and keys.", check=POSITIVE)
    mlp: bool = setting(True, "MoCo v2 projection head: Dense(feature dim) -> ReLU -> Dense(dim).")
    queue_size: int = setting(256, "K, negative keys in the queue; a multiple of the keys per step.", check=POSITIVE)
    moco_momentum: float = setting(
        0.99, "m, moving-average momentum of the key encoder (official --moco-m, 0.999).", check=MOMENTUM
    )
    temperature: float = setting(
        0.1, "T, softmax temperature of InfoNCE (official: 0.07 in v1, 0.2 in v2).", check=POSITIVE_FLOAT
    )
    symmetric: bool = setting(False, "Loss on both view orders (official CIFAR demo); enqueues 2 x batch keys.")
    shuffle_bn: bool = setting(True, "Shuffle the key batch across replicas / BN groups before the key encoder.")
    bn_groups: int = setting(
        4, "BatchNorm statistics per group of batch/bn_groups (shuffle BN on one device).", check=POSITIVE
    )


@dataclasses.dataclass
class DataConfig:
    """What the encoders are fed. Recipe except where to read it from and how to treat bad files."""

    RECIPE: ClassVar[bool] = True
    dataset: str = setting("digits", "digits (embedded), folder, or a TFDS name (imagenet2012, cifar10, ...).")
    image_size: int | None = setting(None, _SIZE_HELP, check=POSITIVE)
    aug: Augmentation = setting("v2", "Augmentation recipe of MoCo v1 or v2.")
    crop_min_scale: float = setting(
        0.5, "Smallest random crop, as a share of the image's area (official 0.2); larger for tiny images, where "
        "a fifth of the image may no longer show the object.", check=SHARE,
    )
    flip: bool = setting(
        False, "Random horizontal flip of the views (official: on); off where mirror images are other objects "
        "(digits).",
    )
    blur: bool = setting(False, "v2's random Gaussian blur (official: on; v1 has none); off for tiny images.")
    data_dir: str | None = setting(None, DATA_DIR_HELP, recipe=False)  # a moved copy of the same data is the same run
    strict_data: bool = setting(False, STRICT_HELP, recipe=False)

    def view_options(self) -> ViewOptions:
        """The crop scale, flip and blur the pretraining views use."""
        return ViewOptions(crop_min_scale=self.crop_min_scale, flip=self.flip, blur=self.blur)


@dataclasses.dataclass
class OptimConfig:
    """SGD and its schedule. All recipe."""

    RECIPE: ClassVar[bool] = True
    epochs: int = setting(15, "Training epochs.", check=POSITIVE)
    batch_size: int = setting(64, "Global batch size, over all replicas and workers.", check=POSITIVE)
    lr: float = setting(
        0.12, "Learning rate per 256 images, scaled linearly with --batch_size (used: lr x batch_size / 256); "
        "at batch 256 the official --lr.", check=POSITIVE_FLOAT,
    )
    schedule: Schedule = setting("cosine", "Learning-rate schedule, set per epoch.")
    milestones: tuple[int, ...] = setting(
        (120, 160), "Epochs where the step schedule multiplies the rate by 0.1.", check=POSITIVE_EPOCHS
    )
    warmup_epochs: int = setting(0, "Linear warm-up epochs (not in the official recipes).", check=NON_NEGATIVE)
    weight_decay: float = setting(
        5e-4, "L2 weight decay, PyTorch style (added to the gradient).", check=NON_NEGATIVE_FLOAT
    )
    sgd_momentum: float = setting(0.9, "SGD momentum (official --momentum).", check=MOMENTUM)


@dataclasses.dataclass
class RuntimeConfig:
    """Where and how a run executes. Operational, except the seed: weights, queue and data order
    follow from it, so a run resumed with another seed would not be the run it continues."""

    RECIPE: ClassVar[bool] = False
    seed: int | None = setting(
        None, "Seed of weights, queue and data order; makes a run repeatable. Without it the data order's seed is "
        "drawn once and kept in the checkpoint, so a resumed run still continues its own order.",
        check=SEED, recipe=True,
    )
    model_dir: str | None = setting(
        None, "Run folder: checkpoints, TensorBoard logs, config. Rerun to resume. Default: "
        "runs/<dataset>-<arch>-<aug>."
    )
    deterministic: bool = setting(
        False, "Deterministic TF ops (slower); with --seed a run stopped and resumed ends bit-identical to an "
        "uninterrupted one.",
    )
    strategy: Strategy = setting("auto", "tf.distribute strategy; auto picks from the hardware.")
    tpu: str | None = setting(None, "TPU name or grpc:// address for --strategy=tpu ('local' on a TPU VM).")
    mixed_precision: Precision = setting("none", "Mixed precision (bf16 on TPU).")
    jit_compile: bool = setting(False, "Compile the train step with XLA (one replica per process, GPU/TPU).")
    steps_per_execution: int | None = setting(
        None, "Train steps per call from the host into the compiled loop (Keras steps_per_execution), so that a TPU "
        "is not idle between steps. Step lines, TensorBoard scalars, checkpoints and the SIGTERM stop happen "
        "between calls: --log_every and --checkpoint_every must be multiples of it. Unset: on a TPU the largest "
        "divisor of both up to 32, elsewhere 1. Above 1 only on a TPU or a single replica.",
        check=POSITIVE_OR_UNSET,
    )
    color_stage: ColorStage = setting(
        "auto", "Where the colour augmentation (jitter, grayscale, blur, normalisation) runs: in the input pipeline "
        "on the host's CPU cores, or inside the train step on the accelerator, so the host only decodes, crops and "
        "flips. The views are the same either way. auto: device when the run has a GPU or TPU.",
    )
    checkpoint_every: int = setting(100, "Checkpoint every N steps (and at every epoch end).", check=NON_NEGATIVE)
    keep_checkpoints: int = setting(3, "Checkpoints kept in model_dir.", check=POSITIVE)
    log_every: int = setting(50, "TensorBoard scalars (and step lines in a log file) every N steps.", check=POSITIVE)
    knn_every: int = setting(
        5, "kNN monitor every N epochs when the data set has labels (0: off).", check=NON_NEGATIVE
    )
    knn_k: int = setting(200, "Neighbours of the kNN monitor.", check=POSITIVE)
    knn_t: float = setting(0.1, "Temperature of the kNN monitor's vote weights.", check=POSITIVE_FLOAT)
    steps_per_epoch: int | None = setting(
        None, "Override steps per epoch (default: images // batch_size).", check=POSITIVE_OR_UNSET
    )
    max_steps: int | None = setting(
        None, "Stop after this many steps in total (a short try-out).", check=POSITIVE_OR_UNSET
    )
    export_dir: str | None = setting(
        None, "Export the query backbone as a TF-Hub SavedModel here at the end. An existing folder is replaced only "
        "when it is a moco_tf export of this same run (or any moco_tf export with --overwrite_export); never the "
        "model_dir, a folder around it, or a folder that is not an export.",
    )
    overwrite_export: bool = setting(False, "Let --export_dir replace a moco_tf export of another run.")
    stop_grace_s: float = setting(
        25.0, "On SIGTERM / SIGINT: seconds allowed to finish the current step and save it before exiting without "
        "(preemptible VMs give about 30 s).", check=POSITIVE_FLOAT,
    )
    peer_timeout: float = setting(
        300.0, "Multi-worker: seconds to wait for every host of TF_CONFIG to start (a host silent for 30 s during "
        "training counts as lost).", check=POSITIVE_FLOAT,
    )
    # Operational: only step 0 reads it (a resume takes its checkpoint's weights), and a moved or
    # deleted source must not block a resume; what the run started from is kept in `source`.
    init_from: str | None = setting(
        None, "Start both encoders (query and key) from these backbone weights: a moco_tf model_dir or checkpoint "
        "(its projection head too, when it has the same shape), a moco_tf TF-Hub export, or a PyTorch checkpoint "
        "(.pth / .pth.tar). Its --arch, --width and --cifar_stem must be this run's. Optimizer and queue start "
        "fresh. Read at step 0 only: a resume takes the checkpoint's weights. Recorded in config.json.",
    )
    allow_more_epochs: bool = setting(
        False, "Resume (e.g. a finished run) with a larger --epochs: the schedule is recomputed over the new total "
        "(a stretched cosine jumps back up), and config.json records the extension. Without it a changed --epochs "
        "is refused as another recipe.",
    )


_SECTION_TYPES = (ModelConfig, DataConfig, OptimConfig, RuntimeConfig)  # in PretrainConfig.SECTIONS order


@dataclasses.dataclass
class PretrainConfig:
    """A whole pretraining run. `unrecorded`: settings the file it was read from did not hold (they
    keep the defaults and are not compared on resume); empty for a config made here."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)
    source: str | None = None  # where the weights came from, e.g. "PyTorch checkpoint X"; not compared
    # Each --allow_more_epochs extension: {"from_epochs", "to_epochs", "at_step"}; not compared.
    extensions: tuple[dict[str, int], ...] = ()
    unrecorded: frozenset[str] = dataclasses.field(default=frozenset(), compare=False, repr=False)

    SECTIONS: ClassVar[tuple[str, ...]] = ("model", "data", "optim", "runtime")

    def __post_init__(self):
        if self.data.image_size is None:
            size = self.model.backbone.default_image_size
            self.data = dataclasses.replace(self.data, image_size=size)

    # -------------------------------------------------------------------- making one

    @classmethod
    def recipe(cls, name: str) -> PretrainConfig:
        """A named recipe of moco_tf.training.recipes (quickstart, cifar10_v2, moco_v2_imagenet, ...)."""
        return cls().replace(**recipes.settings(cls, name))

    def replace(self, **changes: Any) -> PretrainConfig:
        """A copy with settings changed by flag name (`epochs=10`, `arch="resnet50"`, `queue_size=4096`)
        or whole sections (`model=ModelConfig(...)`). Values are checked by validate(), as for flags.
        An image_size that was the old backbone's default follows a changed backbone."""
        flat = {k: v for k, v in changes.items() if k not in self.SECTIONS}
        sections = {s: changes.get(s, getattr(self, s)) for s in self.SECTIONS}
        for name, section_type in zip(self.SECTIONS, _SECTION_TYPES, strict=True):
            if not isinstance(sections[name], section_type):
                raise ConfigError(f"{name} must be a {section_type.__name__}, got {sections[name]!r}")
        owner = _owners()
        unknown = sorted(set(flat) - set(owner))
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]!r}; settings: {', '.join(sorted(owner))}")
        backbone_given = {k: flat.pop(k) for k in BACKBONE_PARTS if k in flat}
        part_types = typing.get_type_hints(BackboneSpec)
        backbone_given = {k: settings.typed(k, v, part_types[k], flags=True) for k, v in backbone_given.items()}
        if backbone_given:
            old = sections["model"].backbone
            new = backbone_spec({**old.to_dict(), **backbone_given}, flags=True)
            sections["model"] = dataclasses.replace(sections["model"], backbone=new)
            if "image_size" not in flat and sections["data"].image_size == old.default_image_size:
                flat["image_size"] = None
        hints = _hints()
        flat = {k: settings.typed(k, v, hints[k], flags=True) for k, v in flat.items()}
        for section in self.SECTIONS:
            mine = {k: v for k, v in flat.items() if owner[k] == section}
            if mine:
                sections[section] = dataclasses.replace(sections[section], **mine)
        return dataclasses.replace(self, **sections)

    # -------------------------------------------------------------------- derived values

    @property
    def moco_version(self) -> str:
        """"v2" for the v2 head with v2 augmentation, else "v1" (recorded for people, never compared)."""
        return "v2" if self.model.mlp and self.data.aug == "v2" else "v1"

    def default_model_dir(self) -> str:
        return os.path.join("runs", f"{self.data.dataset}-{self.model.backbone.tag}-{self.data.aug}")

    def leaves(self) -> list[settings.Leaf]:
        return [leaf for s in self.SECTIONS for leaf in settings.leaves(getattr(self, s))]

    def declarations(self) -> dict[str, settings.Leaf]:
        return {leaf.name: leaf for leaf in self.leaves()}

    @staticmethod
    def declared() -> list[settings.Leaf]:
        """Every setting with its field's own default (image_size None: the backbone's), for flags."""
        return [leaf for section_type in _SECTION_TYPES for leaf in settings.leaves(section_type())]

    def flat(self) -> dict[str, Any]:
        """Every setting by its flag name (arch, width, ..., allow_more_epochs)."""
        return {leaf.name: leaf.value for leaf in self.leaves()}

    def recipe_settings(self) -> dict[str, Any]:
        """The recipe settings by flag name: what a resumed run must share with its model_dir."""
        return {leaf.name: leaf.value for leaf in self.leaves() if leaf.recipe}

    # -------------------------------------------------------------------- checks

    def check_bounds(self) -> None:
        """Each value of the type and within the bounds of its flag, the memory budget included (not
        the rules that tie settings together: a file may leave some unrecorded); for configs read
        from files."""
        check_types([getattr(self, s) for s in self.SECTIONS])
        for leaf in self.leaves():
            settings.check_leaf(leaf)
        values = self.flat()
        check_memory(values["image_size"], values["batch_size"], 2, values["queue_size"], values["dim"],
                     values["arch"], values["width"])

    def validate(self) -> None:
        """Everything checkable before touching data or devices; a ConfigError naming the flag."""
        self.check_bounds()
        values = self.flat()
        if values["warmup_epochs"] > values["epochs"]:
            raise ConfigError(f"--warmup_epochs {values['warmup_epochs']} is more than --epochs {values['epochs']}")
        check_queue_fits(values["queue_size"], values["batch_size"], values["symmetric"])
        if values["image_size"] < MIN_IMAGE_SIZE:
            raise ConfigError(f"--image_size {values['image_size']} is too small (at least {MIN_IMAGE_SIZE})")
        check_outside_data({**values, "model_dir": values["model_dir"] or self.default_model_dir()})

    def check_replicas(self, replicas: int) -> None:
        """The global batch must split evenly over the replicas, and each replica's over bn_groups."""
        batch, groups = self.optim.batch_size, self.model.bn_groups
        if batch % replicas:
            raise ConfigError(f"--batch_size {batch} is not divisible by the {replicas} replicas")
        if (batch // replicas) % groups:
            raise ConfigError(f"the per-replica batch {batch // replicas} is not divisible by --bn_groups")

    def steps_per_epoch(self, num_examples: int, dataset_name: str) -> int:
        """--steps_per_epoch, or the whole batches in the pretraining split (at least one)."""
        steps = self.runtime.steps_per_epoch or num_examples // self.optim.batch_size
        if steps < 1:
            raise ConfigError(f"{dataset_name} has {num_examples} images, fewer than one --batch_size")
        return steps

    def total_steps(self, steps_per_epoch: int) -> int:
        """Steps the run trains in all: every epoch, or fewer with --max_steps."""
        total = self.optim.epochs * steps_per_epoch
        return min(total, self.runtime.max_steps) if self.runtime.max_steps else total

    # -------------------------------------------------------------------- files and flags

    def to_dict(self) -> dict[str, Any]:
        """The structured config.json content; unrecorded settings are left out."""
        out: dict[str, Any] = {"format_version": FORMAT_VERSION, "moco_version": self.moco_version}
        for section in self.SECTIONS:
            out[section] = section_to_dict(getattr(self, section), self.unrecorded)
        if self.source is not None:
            out["source"] = self.source
        if self.extensions:
            out["extensions"] = [dict(e) for e in self.extensions]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PretrainConfig:
        """From a parsed config.json; only moco_tf's format (its format_version) is read."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"a config must be a JSON object, got {type(values).__name__}")
        check_format_version(values)
        unknown = sorted(set(values) - {"format_version", "moco_version", "source", "extensions", *cls.SECTIONS})
        if unknown:
            raise ConfigError(f"unknown config key {unknown[0]!r} (written by a newer moco_tf?)")
        unrecorded: set[str] = set()
        sections = {}
        for name, section_type in zip(cls.SECTIONS, _SECTION_TYPES, strict=True):
            given = values.get(name, {})
            if not isinstance(given, Mapping):
                raise ConfigError(f"config key {name!r} must be an object, got {given!r}")
            sections[name] = section_from_dict(section_type, given, name, unrecorded)
        return cls(**sections, source=_source(values), extensions=_extensions(values), unrecorded=frozenset(unrecorded))

    @classmethod
    def from_record(cls, values: Mapping[str, Any]) -> PretrainConfig:
        """From settings by flag name that a file or a converted checkpoint records (what its weights
        and the official recipe tell), plus source / moco_version; the settings it does not hold keep
        the defaults and are unrecorded (not compared on resume). Checked as config.json is."""
        owner, structured = _owners(), {"format_version": FORMAT_VERSION}
        for name, value in values.items():
            if name in BACKBONE_PARTS:
                structured.setdefault("model", {}).setdefault("backbone", {})[name] = value
            elif name in owner:
                structured.setdefault(owner[name], {})[name] = value
            elif name in ("source", "moco_version", "extensions"):
                structured[name] = value
            else:
                raise ConfigError(f"unknown setting {name!r}")
        return cls.from_dict(structured)

    @classmethod
    def from_json(cls, text: str) -> PretrainConfig:
        return cls.from_dict(json_values(text))

    @classmethod
    def from_flags(cls, flag_values: Any) -> PretrainConfig:
        """From absl FlagValues (the flags the user gave, over --recipe's values or the defaults),
        or a mapping of flag name -> value (every entry given; "recipe" names the base)."""
        values = given_flags(flag_values)
        if "momentum" in values and "moco_momentum" not in values:  # never guess which momentum was meant
            raise ConfigError(
                "--momentum is ambiguous: --moco_momentum is the key encoder's m, --sgd_momentum SGD's momentum "
                "(main_moco.py's --momentum)"
            )
        name = values.pop("recipe", None)
        base = cls.recipe(name) if name else cls()
        return base.replace(**typed_flags(values, base.declarations()))


def _owners() -> dict[str, str]:
    """Flag name -> the PretrainConfig section that holds it."""
    out = {}
    for section, section_type in zip(PretrainConfig.SECTIONS, _SECTION_TYPES, strict=True):
        for field in settings.settings_of(section_type):
            for name in field.metadata["parts"] or (field.name,):
                out[name] = section
    return out


def _hints() -> dict[str, Any]:
    """Flag name -> its type, for the settings of PretrainConfig outside the backbone."""
    return {name: hint for t in _SECTION_TYPES for name, hint in typing.get_type_hints(t).items()
            if name != "backbone" and name != "RECIPE"}


def given_flags(flag_values: Any) -> dict[str, Any]:
    if hasattr(flag_values, "flag_values_dict"):  # absl: only what the command line (or a flagfile) set
        return {name: flag_values[name].value for name in flag_values if flag_values[name].present}
    return dict(flag_values)


def typed_flags(values: Mapping[str, Any], declared: Mapping[str, settings.Leaf]) -> dict[str, Any]:
    """The values of the flags that are settings (`declared`: a config's declarations()), a list
    flag's strings (absl's DEFINE_list) as the tuple of integers its field holds; errors name the flag."""
    out = {}
    for name, value in values.items():
        if name not in declared:
            continue  # the command line's own flags (--flagfile, --verbosity, ...)
        is_list = typing.get_origin(settings.required(declared[name].hint)) is tuple
        out[name] = settings.parse_list_of_ints(name, value) if is_list else value
    return out


# What one run may ask of a host's memory for any one of: a batch of input views (float32), the
# queue, the weights of one encoder (with the key encoder and the SGD buffer: x3). A value that
# needs more is a typo (an extra zero, --image_size=100000), refused before anything is built.
MEMORY_BUDGET = 64 << 30
# Parameters of the registered backbones at width 64 (torchvision's counts); they grow with width**2.
_PARAMS_AT_WIDTH_64 = {"resnet18": 11.7e6, "resnet34": 21.8e6, "resnet50": 25.6e6, "resnet101": 44.5e6,
                       "resnet152": 60.2e6}


def _gib(n: float) -> str:
    return f"{n / (1 << 30):,.1f} GiB"


def check_memory(
    image_size: int | None = None, batch_size: int = 1, views: int = 1,
    queue_size: int = 0, dim: int = 0, arch: str | None = None, width: int | None = None,
) -> None:
    """Refuses, naming the flag and the memory it would take, settings whose batch of views, queue
    or weights cannot fit MEMORY_BUDGET; the same rule for flags and for values read from files."""
    if image_size:
        need = float(batch_size) * views * image_size * image_size * 3 * 4
        if need > MEMORY_BUDGET:
            raise ConfigError(
                f"--image_size {image_size} needs {_gib(need)} for one batch of {batch_size} x {views} view(s) "
                f"(more than {_gib(MEMORY_BUDGET)}): give a smaller --image_size or --batch_size"
            )
    if queue_size and dim:
        need = float(queue_size) * dim * 4
        if need > MEMORY_BUDGET:
            raise ConfigError(f"--queue_size {queue_size} x --dim {dim} needs {_gib(need)} (more than "
                              f"{_gib(MEMORY_BUDGET)})")
    if width:
        need = 3 * 4 * _PARAMS_AT_WIDTH_64.get(arch or "", max(_PARAMS_AT_WIDTH_64.values())) * (width / 64) ** 2
        if need > MEMORY_BUDGET:
            raise ConfigError(f"--width {width} needs about {_gib(need)} of weights (more than {_gib(MEMORY_BUDGET)})")


def check_recorded(values: Mapping[str, Any], where: str) -> None:
    """Settings a file records by flag name (an export's assets/moco_config.json, a converted
    checkpoint's record) within the bounds of their flags, memory budget included, before anything
    is built from them; a ConfigError naming `where` and the setting."""
    numbers = {k: v for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    try:
        check_named(numbers, PretrainConfig().declarations())
        for name, value in numbers.items():
            if not math.isfinite(value):
                raise ConfigError(f"--{name} must be a finite number, got {value}")
        check_memory(numbers.get("image_size"), 1, 1, numbers.get("queue_size", 0), numbers.get("dim", 0),
                     values.get("arch") if isinstance(values.get("arch"), str) else None, numbers.get("width"))
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def check_outside_data(values: Mapping[str, Any]) -> None:
    """Refuses a --model_dir or --export_dir inside a folder dataset's --data_dir: every subfolder
    there is a class, so the run's own folder would become one on the next run (other classes,
    another recipe, a broken resume). Refused rather than left out of the listing: the data
    folder stays the user's images only, and what a run trains on never depends on its outputs."""
    data_dir = values.get("data_dir")
    if values.get("dataset") != "folder" or not data_dir or "://" in data_dir:
        return
    root = os.path.realpath(data_dir)
    for name in ("model_dir", "export_dir"):
        path = values.get(name)
        if path and "://" not in path:
            real = os.path.realpath(path)
            if real == root or real.startswith(root + os.sep):
                raise ConfigError(
                    f"--{name}={path} is inside --data_dir={data_dir}, where every folder is a class of images: "
                    f"put it outside the data"
                )


def check_queue_fits(queue_size: int, global_batch_size: int, symmetric: bool = False) -> None:
    """queue_size must be a multiple of the keys enqueued per step (so the queue pointer wraps):
    the model's own rule (moco.check_queue_fits), worded for the flags."""
    try:
        moco.check_queue_fits(queue_size, global_batch_size, symmetric)
    except ValueError as error:
        raise ConfigError(f"--{error}") from None




def check_named(values: Mapping[str, Any], declared: Mapping[str, settings.Leaf]) -> None:
    """Settings by flag name (a command line's numeric flags, values a file records) within the
    bounds `declared` gives for them (a config's `declarations()`, plus a command line's own
    flags); any integer at most 2**31 - 1; a ConfigError naming the first one out of bounds."""
    for name, value in values.items():
        leaf = declared.get(name)
        if leaf is None:
            if isinstance(value, int) and not isinstance(value, bool) and value > settings.MAX_INT:
                raise ConfigError(f"--{name} must be at most 2**31 - 1, got {value}")
            continue
        settings.check_leaf(dataclasses.replace(leaf, value=value))


# ----------------------------------------------------------------------------------------------
# resume


def recipe_differences(saved: Any, current: Any) -> list[str]:
    """"--flag=saved (now current)" for each recipe setting that differs; settings `saved` did not
    record are not compared."""
    before, now = saved.recipe_settings(), current.recipe_settings()
    skip = saved.unrecorded | current.unrecorded
    return [
        f"--{name}={shown(before[name])} (now {shown(now[name])})"
        for name in before
        if name not in skip and before[name] != now[name]
    ]


def check_same_run(
    saved: Any, current: Any, model_dir: str
) -> None:
    """Refuses to resume a run of another recipe, naming each flag that differs and both values."""
    differ = recipe_differences(saved, current)
    if differ:
        run = getattr(saved, "RUN_KIND", "another run")
        raise RunMismatchError(
            f"model_dir {model_dir} holds {run}: {', '.join(differ)}; rerun with its values or use a new --model_dir"
        )


# ----------------------------------------------------------------------------------------------
# reading and writing


def check_format_version(values: Mapping[str, Any]) -> None:
    """Only moco_tf's own files are read as configs: another program's config.json is refused."""
    if "format_version" not in values:
        raise ConfigError("not a moco_tf config: no format_version")
    version = values["format_version"]
    if version != FORMAT_VERSION:
        raise ConfigError(f"config format_version {version!r} is not {FORMAT_VERSION} (another moco_tf version)")


def json_values(text: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_no_repeated_keys)
    except json.JSONDecodeError as error:
        raise ConfigError(f"not valid JSON ({error})") from None


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict; a key given twice (a hand edit: which one was meant?) is refused."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ConfigError(f"key {key!r} is given twice")
        seen[key] = value
    return seen


def check_types(sections: list[Any]) -> None:
    """Each setting of the type its field declares (a config built in Python is not checked by a parser)."""
    for section in sections:
        hints = typing.get_type_hints(type(section))
        for field in settings.settings_of(type(section)):
            if hints[field.name] is not BackboneSpec:  # a BackboneSpec checks itself
                settings.typed(field.name, getattr(section, field.name), hints[field.name], flags=True)


def section_to_dict(section: Any, unrecorded: frozenset[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in settings.settings_of(type(section)):
        value = getattr(section, field.name)
        if isinstance(value, BackboneSpec):
            out[field.name] = value.to_dict()
        elif field.name not in unrecorded:
            out[field.name] = list(value) if isinstance(value, tuple) else value
    return out


def section_from_dict(
    section_type: type, given: Mapping[str, Any], section_name: str | None, unrecorded: set[str]
) -> Any:
    """A section from its dict; missing keys keep the defaults and are added to `unrecorded`."""
    hints = typing.get_type_hints(section_type)
    fields = {f.name: f for f in settings.settings_of(section_type)}
    unknown = sorted(set(given) - set(fields))
    if unknown:
        where = f"{section_name}.{unknown[0]}" if section_name else unknown[0]
        raise ConfigError(f"unknown config key {where!r} (written by a newer moco_tf?)")
    kwargs = {}
    for name in fields:
        if hints[name] is BackboneSpec:
            if name not in given:
                raise ConfigError("the config records no backbone (arch)")
            kwargs[name] = backbone_spec(given[name], flags=False)
        elif name in given:
            kwargs[name] = settings.typed(name, given[name], hints[name], flags=False)
        else:
            unrecorded.add(name)
    return section_type(**kwargs)


def backbone_spec(values: Any, flags: bool) -> BackboneSpec:
    """A BackboneSpec, its errors worded for flags (--width ...) or for a file (width ...)."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"backbone must be an object, got {values!r}")
    if values.get("arch") is None:
        raise ConfigError("the config records no arch")
    try:
        get_backbone(values["arch"])
    except ValueError as error:  # "unknown arch 'x'; choose one of ..."
        raise ConfigError(str(error)) from None
    dash = "--" if flags else ""
    width = values.get("width")
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
        raise ConfigError(f"{dash}width must be positive, got {width}")
    try:
        return BackboneSpec.from_dict(values)
    except ValueError as error:
        raise ConfigError(f"{dash}{error}") from None


def _source(values: Mapping[str, Any]) -> str | None:
    source = values.get("source")
    if source is not None and not isinstance(source, str):
        raise ConfigError(f"source must be a string, got {source!r}")
    return source


def _extensions(values: Mapping[str, Any]) -> tuple[dict[str, int], ...]:
    given = values.get("extensions", [])
    keys = {"from_epochs", "to_epochs", "at_step"}
    ok = isinstance(given, list) and all(
        isinstance(e, dict) and set(e) == keys and all(type(v) is int for v in e.values()) for e in given
    )
    if not ok:
        raise ConfigError(f"extensions must be a list of {{from_epochs, to_epochs, at_step}} objects, got {given!r}")
    return tuple(dict(e) for e in given)
