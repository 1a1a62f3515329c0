"""One run config: the pretraining recipe and the operational settings as typed dataclasses,
validated once, written to and read from model_dir/config.json, compared once on resume.

    PretrainConfig
      model:   ModelConfig    backbone (BackboneSpec: arch, width, cifar_stem), dim, mlp, queue_size,
                              moco_momentum, temperature, symmetric, shuffle_bn, bn_groups
      data:    DataConfig     dataset, image_size, aug, crop_min_scale, flip, blur; data_dir, strict_data
                              (operational)
      optim:   OptimConfig    epochs, batch_size, lr, schedule, milestones, warmup_epochs,
                              weight_decay, sgd_momentum
      runtime: RuntimeConfig  seed (recipe); model_dir, strategy, checkpoints, logging, ... (operational)

Recipe fields change the math: resuming a model_dir with any of them changed is refused.
Operational fields (where files are, how often to log or save, which devices) may change between
a run and its resume. Each field's flag is named like the field (the backbone's: --arch,
--width, --cifar_stem), so messages name the flag the user typed.

config.json: `to_json` writes the structured format below; `from_json` also reads the flat one
of earlier moco_tf versions (one object of flag values, `momentum` for the key encoder's m,
`width` missing before --width existed), so old model_dirs still load and resume.

    {"format_version": 2, "moco_version": "v2",
     "model": {"backbone": {"arch": ..., "width": ..., "cifar_stem": ...}, "dim": ..., ...},
     "data": {...}, "optim": {...}, "runtime": {...}, "source": "..." (where the weights came from)}

A key a file does not hold (a converted PyTorch checkpoint records only what its weights and the
official recipe tell) takes the default, is listed in `unrecorded`, and is not compared.

LinearConfig is the same for the linear classification protocol (lincls_config.json),
FinetuneConfig for fine-tuning (finetune_config.json).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, Literal

from moco_tf.data.augment import ViewOptions
from moco_tf.data.sources import MIN_IMAGE_SIZE
from moco_tf.errors import UserError
from moco_tf.models import moco
from moco_tf.models.backbones import BackboneSpec, get_backbone
from moco_tf.training.distribute import STRATEGIES

FORMAT_VERSION = 2
Schedule = Literal["step", "cosine"]
Augmentation = Literal["v1", "v2"]
Precision = Literal["none", "bf16", "fp16"]
# --mixed_precision -> the Keras dtype policy it sets (bf16 on TPU; fp16 with loss scaling).
PRECISION_POLICIES: dict[str, str] = {"none": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
ColorStage = Literal["auto", "host", "device"]


class ConfigError(UserError):
    """A setting out of range, or a config file that does not hold a valid config; one line naming
    the flag (or the key)."""


class RunMismatchError(ConfigError):
    """model_dir holds a run of another recipe."""


def _recipe(default: Any) -> Any:
    return dataclasses.field(default=default, metadata={"recipe": True})


def _operational(default: Any) -> Any:
    return dataclasses.field(default=default, metadata={"recipe": False})


# ----------------------------------------------------------------------------------------------
# the sections (flags of `python -m moco_tf.train`; defaults: the MoCo v1 ImageNet recipe)


@dataclasses.dataclass
class ModelConfig:
    """The MoCo model. All recipe."""

    RECIPE: ClassVar[bool] = True
    backbone: BackboneSpec = dataclasses.field(default_factory=BackboneSpec)
    dim: int = 128  # projection dimension of queries and keys
    mlp: bool = False  # MoCo v2 head: Dense(feature dim) -> ReLU -> Dense(dim)
    queue_size: int = 65536  # K, negative keys; a multiple of the keys enqueued per step
    moco_momentum: float = 0.999  # m of the key encoder's moving average (not SGD momentum)
    temperature: float = 0.07  # T of InfoNCE; v2 uses 0.2
    symmetric: bool = False  # loss on both view orders (official CIFAR demo)
    shuffle_bn: bool = True
    bn_groups: int = 1  # BatchNorm statistics per group of batch / bn_groups (shuffle BN on 1 device)


@dataclasses.dataclass
class DataConfig:
    """What the encoders are fed. Recipe except where to read it from and how to treat bad files."""

    RECIPE: ClassVar[bool] = True
    dataset: str = "digits"  # digits (embedded), folder, or a TFDS name (imagenet2012, cifar10, ...)
    image_size: int | None = None  # side of the crops; None: the backbone's default (32 or 224)
    aug: Augmentation = "v1"
    # Departures from the official views for data they do not fit (tiny images): augment.ViewOptions.
    crop_min_scale: float = 0.2  # smallest crop area, share of the image (official 0.2)
    flip: bool = True  # random horizontal flip (official); off for digits, whose mirror images are other shapes
    blur: bool = True  # v2's Gaussian blur (official); v1 has none
    data_dir: str | None = _operational(None)  # a moved copy of the same data is the same run
    strict_data: bool = _operational(False)  # stop at the first unreadable image instead of skipping

    def view_options(self) -> ViewOptions:
        """The crop scale, flip and blur the pretraining views use."""
        return ViewOptions(crop_min_scale=self.crop_min_scale, flip=self.flip, blur=self.blur)


@dataclasses.dataclass
class OptimConfig:
    """SGD and its schedule. All recipe."""

    RECIPE: ClassVar[bool] = True
    epochs: int = 200
    batch_size: int = 256  # global, over all replicas and workers
    lr: float = 0.03  # per 256 images, scaled linearly with batch_size (official: the same number)
    schedule: Schedule = "step"
    milestones: tuple[int, ...] = (120, 160)  # epochs where the step schedule multiplies lr by 0.1
    warmup_epochs: int = 0
    weight_decay: float = 1e-4  # PyTorch style: added to the gradient
    sgd_momentum: float = 0.9


@dataclasses.dataclass
class RuntimeConfig:
    """Where and how a run executes. Operational, except the seed: weights, queue and data order
    follow from it, so a run resumed with another seed would not be the run it continues."""

    RECIPE: ClassVar[bool] = False
    seed: int | None = _recipe(None)
    model_dir: str | None = None  # None: runs/<dataset>-<arch>-<aug>
    deterministic: bool = False
    strategy: str = "auto"
    tpu: str | None = None
    mixed_precision: Precision = "none"
    jit_compile: bool = False
    # Train steps per host call (Keras steps_per_execution); None: auto, 1 off a TPU (pretrain.py).
    steps_per_execution: int | None = None
    # Where the colour augmentation runs; the views are the same either way (auto: device on GPU/TPU).
    color_stage: ColorStage = "auto"
    checkpoint_every: int = 1000  # steps; also at every epoch end
    keep_checkpoints: int = 3
    log_every: int = 50
    knn_every: int = 10  # epochs; 0: off
    knn_k: int = 200
    knn_t: float = 0.1
    steps_per_epoch: int | None = None  # None: images // batch_size
    max_steps: int | None = None
    export_dir: str | None = None
    overwrite_export: bool = False
    stop_grace_s: float = 25.0
    peer_timeout: float = 300.0  # multi-worker: seconds to wait for every host of TF_CONFIG
    # Operational: only step 0 reads it (a resume takes its checkpoint's weights), and a moved or
    # deleted source must not block a resume; what the run started from is kept in `source`.
    init_from: str | None = None  # model_dir, checkpoint, TF-Hub export or PyTorch checkpoint (absolute)
    allow_more_epochs: bool = False  # a resume may raise --epochs (extensions are recorded)


_SECTION_TYPES = (ModelConfig, DataConfig, OptimConfig, RuntimeConfig)  # in PretrainConfig.SECTIONS order


@dataclasses.dataclass
class PretrainConfig:
    """A whole pretraining run. `unrecorded`: flags whose values the file it was read from did not
    hold (they keep the defaults and are not compared on resume); empty for a config made here."""

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

    # -------------------------------------------------------------------- derived values

    @property
    def moco_version(self) -> str:
        """"v2" for the v2 head with v2 augmentation, else "v1" (recorded for people, never compared)."""
        return "v2" if self.model.mlp and self.data.aug == "v2" else "v1"

    def default_model_dir(self) -> str:
        return os.path.join("runs", f"{self.data.dataset}-{self.model.backbone.tag}-{self.data.aug}")

    def flat(self) -> dict[str, Any]:
        """Every setting by its flag name (arch, width, ..., stop_grace_s)."""
        return {name: value for name, value, _ in _leaves(self, self.SECTIONS)}

    def recipe(self) -> dict[str, Any]:
        """The recipe settings by flag name: what a resumed run must share with its model_dir."""
        return {name: value for name, value, recipe in _leaves(self, self.SECTIONS) if recipe}

    # -------------------------------------------------------------------- checks

    def validate(self) -> None:
        """Everything checkable before touching data or devices; a ConfigError naming the flag."""
        _check_types([getattr(self, s) for s in self.SECTIONS])
        values = self.flat()
        if values["image_size"] is None:
            raise ConfigError("--image_size must be an integer, got None")
        _check_table(values)
        if values["seed"] is not None and not 0 <= values["seed"] < 2**31:
            raise ConfigError(f"--seed must be in [0, 2**31), got {values['seed']}")
        if values["strategy"] not in STRATEGIES:
            raise ConfigError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {values['strategy']!r}")
        if values["warmup_epochs"] > values["epochs"]:
            raise ConfigError(f"--warmup_epochs {values['warmup_epochs']} is more than --epochs {values['epochs']}")
        check_queue_fits(values["queue_size"], values["batch_size"], values["symmetric"])
        check_memory(values["image_size"], values["batch_size"], 2, values["queue_size"], values["dim"],
                     values["arch"], values["width"])
        if any(m < 1 for m in values["milestones"]):
            raise ConfigError(f"--milestones must be positive epochs, got {_shown(values['milestones'])}")
        if values["image_size"] < MIN_IMAGE_SIZE:
            raise ConfigError(f"--image_size {values['image_size']} is too small (at least {MIN_IMAGE_SIZE})")
        check_outside_data({**values, "model_dir": values["model_dir"] or self.default_model_dir()})

    def check_bounds(self) -> None:
        """Each value within the bounds of its flag, the memory budget included (not the rules that
        tie flags together: a file may leave some unrecorded); for configs read from files."""
        _check_types([getattr(self, s) for s in self.SECTIONS])
        values = self.flat()
        _check_table(values)
        if values["seed"] is not None and not 0 <= values["seed"] < 2**31:
            raise ConfigError(f"--seed must be in [0, 2**31), got {values['seed']}")
        check_memory(values["image_size"], values["batch_size"], 2, values["queue_size"], values["dim"],
                     values["arch"], values["width"])

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
            out[section] = _section_to_dict(getattr(self, section), self.unrecorded)
        if self.source is not None:
            out["source"] = self.source
        if self.extensions:
            out["extensions"] = [dict(e) for e in self.extensions]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PretrainConfig:
        """From a parsed config.json, structured or the flat format of earlier versions."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"a config must be a JSON object, got {type(values).__name__}")
        if "format_version" not in values:
            _check_old_file(values, set(PretrainConfig().flat()) | _OLD_PRETRAIN_KEYS)
            return _from_flat(values, flags=False)
        version = values["format_version"]
        if version != FORMAT_VERSION:
            raise ConfigError(f"config format_version {version!r} is not {FORMAT_VERSION} (another moco_tf version)")
        unknown = sorted(set(values) - {"format_version", "moco_version", "source", "extensions", *cls.SECTIONS})
        if unknown:
            raise ConfigError(f"unknown config key {unknown[0]!r} (written by a newer moco_tf?)")
        unrecorded: set[str] = set()
        sections = {}
        for name, section_type in zip(cls.SECTIONS, _SECTION_TYPES, strict=True):
            given = values.get(name, {})
            if not isinstance(given, Mapping):
                raise ConfigError(f"config key {name!r} must be an object, got {given!r}")
            sections[name] = _section_from_dict(section_type, given, name, unrecorded)
        return cls(
            **sections, source=_source(values), extensions=_extensions(values),
            unrecorded=_older_files_implied(unrecorded),
        )  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> PretrainConfig:
        return cls.from_dict(_json_values(text))

    @classmethod
    def from_flags(cls, flag_values: Any) -> PretrainConfig:
        """From absl FlagValues (or a mapping of flag name -> value); absent flags keep the defaults.

        Flag names are the fields' (`--moco_momentum` for m, `--sgd_momentum` for SGD's); --milestones
        may be a list of strings, as absl's DEFINE_list gives."""
        values = dict(flag_values.flag_values_dict() if hasattr(flag_values, "flag_values_dict") else flag_values)
        if "momentum" in values and "moco_momentum" not in values:  # never guess which momentum was meant
            raise ConfigError(
                "--momentum is ambiguous: --moco_momentum is the key encoder's m, --sgd_momentum SGD's momentum "
                "(main_moco.py's --momentum)"
            )
        if "milestones" in values:
            values["milestones"] = parse_milestones(values["milestones"])
        return _from_flat(values, flags=True)


def parse_milestones(milestones: Any) -> tuple[int, ...]:
    """Epochs from a flag list ("120,160" or ["120", "160"]) as integers."""
    items = milestones.split(",") if isinstance(milestones, str) else list(milestones)
    items = [m.strip() if isinstance(m, str) else m for m in items if m != ""]
    try:
        if any(isinstance(m, bool) or not isinstance(m, int | str) for m in items):
            raise ValueError
        return tuple(int(m) for m in items)
    except ValueError:
        raise ConfigError(f"--milestones must be epochs (integers), got {_shown(items)}") from None


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
        _check_table(numbers)
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


# ----------------------------------------------------------------------------------------------
# resume


def recipe_differences(saved: PretrainConfig | LinearConfig, current: PretrainConfig | LinearConfig) -> list[str]:
    """"--flag=saved (now current)" for each recipe setting that differs; settings `saved` did not
    record are not compared."""
    before, now = saved.recipe(), current.recipe()
    skip = saved.unrecorded | current.unrecorded
    return [
        f"--{name}={_shown(before[name])} (now {_shown(now[name])})"
        for name in before
        if name not in skip and before[name] != now[name]
    ]


def check_same_run(
    saved: PretrainConfig | LinearConfig, current: PretrainConfig | LinearConfig, model_dir: str
) -> None:
    """Refuses to resume a run of another recipe, naming each flag that differs and both values."""
    differ = recipe_differences(saved, current)
    if differ:
        run = (
            "another linear classifier run" if isinstance(saved, LinearConfig)
            else "another fine-tuning run" if isinstance(saved, FinetuneConfig) else "another run"
        )
        raise RunMismatchError(
            f"model_dir {model_dir} holds {run}: {', '.join(differ)}; rerun with its values or use a new --model_dir"
        )


# ----------------------------------------------------------------------------------------------
# the linear classification protocol (`python -m moco_tf.lincls`)


class _EvaluationRecipe:
    """What the lincls and finetune configs share: one flat section, all of it recipe unless marked
    operational, written to and read from the model_dir's JSON file, read from the flags."""

    RECIPE: ClassVar[bool] = True
    unrecorded: frozenset[str]
    _SEEDS: ClassVar[tuple[str, ...]] = ("seed",)
    _LIMITS: ClassVar[tuple[str, ...]] = ("limit_val",)
    _READS_OLD_FILES: ClassVar[bool] = False  # files from before format_version (see _from_old_file)

    def flat(self) -> dict[str, Any]:
        return {name: value for name, value, _ in _leaves(self, None)}

    def recipe(self) -> dict[str, Any]:
        return {name: value for name, value, recipe in _leaves(self, None) if recipe}

    def _validate_common(self) -> dict[str, Any]:
        _check_types([self])
        values = self.flat()
        _check_table(values)
        for name in self._LIMITS:
            if values[name] < 0:
                raise ConfigError(f"--{name} must be >= 0, got {values[name]}")
        for name in self._SEEDS:
            if values[name] is not None and not 0 <= values[name] < 2**31:
                raise ConfigError(f"--{name} must be in [0, 2**31), got {values[name]}")
        if values["image_size"] is not None and values["image_size"] < MIN_IMAGE_SIZE:
            raise ConfigError(f"--image_size {values['image_size']} is too small (at least {MIN_IMAGE_SIZE})")
        check_memory(values["image_size"], values["batch_size"], arch=values.get("arch"), width=values.get("width"))
        check_outside_data(values)
        return values

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, **_section_to_dict(self, self.unrecorded)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def _from_old_file(cls, values: dict[str, Any]) -> dict[str, Any]:
        """A file written before format_version, restated in today's meaning."""
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Any:
        if not isinstance(values, Mapping):
            raise ConfigError(f"a config must be a JSON object, got {type(values).__name__}")
        given = {k: v for k, v in values.items() if k != "format_version"}
        old = "format_version" not in values and cls._READS_OLD_FILES
        if old:
            _check_old_file(values, {f.name for f in _fields(cls)})
            given = cls._from_old_file(given)
        unrecorded: set[str] = set()
        config = _section_from_dict(cls, given, None, unrecorded, ignore_unknown=old)
        return dataclasses.replace(config, unrecorded=frozenset(unrecorded))

    @classmethod
    def from_json(cls, text: str) -> Any:
        return cls.from_dict(_json_values(text))

    @classmethod
    def from_flags(cls, flag_values: Any) -> Any:
        values = dict(flag_values.flag_values_dict() if hasattr(flag_values, "flag_values_dict") else flag_values)
        names = {f.name for f in dataclasses.fields(cls)} - {"unrecorded"}
        given = {k: v for k, v in values.items() if k in names}
        if "milestones" in given:
            given["milestones"] = parse_milestones(given["milestones"])
        return _section_from_dict(cls, given, None, set(), flags=True)


@dataclasses.dataclass
class LinearConfig(_EvaluationRecipe):
    """Linear classification on a frozen encoder; defaults: the official protocol (main_lincls.py).
    Everything that changes the classifier's training is recipe: a rerun in the same model_dir
    resumes only with the same."""

    pretrained: str | None = None  # model_dir, checkpoint, TF-Hub export or .pth (record it absolute)
    dataset: str | None = None
    image_size: int | None = None  # None: the encoder's default (32 with the CIFAR stem, else 224)
    batch_size: int = 256
    epochs: int = 100
    lr: float = 30.0  # per 256 images, scaled linearly with batch_size, as --lr of pretraining (one meaning)
    sgd_momentum: float = 0.9
    weight_decay: float = 0.0
    milestones: tuple[int, ...] = (60, 80)  # epochs where lr is multiplied by 0.1
    precompute_features: bool = False  # not the official protocol: no augmentation
    seed: int | None = None
    data_dir: str | None = _operational(None)
    strict_data: bool = _operational(False)
    limit_train: int = _operational(0)
    limit_val: int = _operational(0)
    model_dir: str | None = _operational(None)
    unrecorded: frozenset[str] = dataclasses.field(default=frozenset(), compare=False, repr=False)

    _LIMITS: ClassVar[tuple[str, ...]] = ("limit_train", "limit_val")
    _READS_OLD_FILES: ClassVar[bool] = True

    def validate(self) -> None:
        values = self._validate_common()
        if any(m < 1 for m in values["milestones"]):
            raise ConfigError(f"--milestones must be positive epochs, got {_shown(values['milestones'])}")

    @classmethod
    def _from_old_file(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Files of earlier versions record only pretrained, dataset, image_size,
        precompute_features, batch_size, and the lr as used (see _lr_per_256) and epochs."""
        return _lr_per_256(values)


def _lr_per_256(values: dict[str, Any]) -> dict[str, Any]:
    """A lincls_config.json from before format_version recorded the lr used as given (as
    main_lincls.py's --lr); today's --lr is per 256 images. Restated, so that the same run resumed
    with today's flags compares equal: lr 7.5 at batch 64 was --lr=30 per 256."""
    lr, batch = values.get("lr"), values.get("batch_size")
    if isinstance(lr, (int, float)) and isinstance(batch, int) and batch > 0:
        return {**values, "lr": lr * 256 / batch}
    return values


# ----------------------------------------------------------------------------------------------
# fine-tuning (`python -m moco_tf.finetune`)


@dataclasses.dataclass
class FinetuneConfig(_EvaluationRecipe):
    """Fine-tuning the whole encoder and a new head on a fraction of the labels; defaults: the
    SimCLR v1 semi-supervised recipe (`moco_tf.evaluation.finetune`). Recipe as for LinearConfig:
    a rerun in the same model_dir resumes only with the same. arch / width / cifar_stem are the
    backbone's (read from --pretrained, or given with --random_init)."""

    pretrained: str | None = None  # model_dir, checkpoint, TF-Hub export or .pth (absolute); None: random init
    random_init: bool = False
    arch: str = "resnet50"
    width: int = 64
    cifar_stem: bool = False
    dataset: str | None = None
    image_size: int | None = None
    label_fraction: float = 1.0
    subset_seed: int = 0  # which examples form the labelled subset (class-balanced)
    batch_size: int = 256
    epochs: int | None = None  # None: the recipe's for the fraction (60 at 1%, 30 at 10%)
    lr: float = 0.05  # per 256 images, scaled linearly with batch_size
    sgd_momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    seed: int | None = None  # head initialisation, data order, augmentation
    data_dir: str | None = _operational(None)
    strict_data: bool = _operational(False)
    limit_val: int = _operational(0)
    model_dir: str | None = _operational(None)
    eval_every: int = _operational(1)
    export_dir: str | None = _operational(None)
    overwrite_export: bool = _operational(False)
    unrecorded: frozenset[str] = dataclasses.field(default=frozenset(), compare=False, repr=False)

    _SEEDS: ClassVar[tuple[str, ...]] = ("seed", "subset_seed")

    def validate(self) -> None:
        values = self._validate_common()
        if not 0.0 < values["label_fraction"] <= 1.0:
            raise ConfigError(f"--label_fraction must be in (0, 1], got {values['label_fraction']}")
        if values["eval_every"] < 1:
            raise ConfigError(f"--eval_every must be positive, got {values['eval_every']}")
        if self.random_init == bool(self.pretrained):
            raise ConfigError("give either --pretrained=PATH or --random_init (with --arch, --width, --cifar_stem)")
        if self.random_init:
            _backbone({"arch": self.arch, "width": self.width, "cifar_stem": self.cifar_stem}, flags=True)


# ----------------------------------------------------------------------------------------------
# Keys of config files from before format_version besides today's flag names.
_OLD_PRETRAIN_KEYS = frozenset({"momentum", "moco_version", "source", "extensions"})


def _check_old_file(values: Mapping[str, Any], known: set[str]) -> None:
    """A config without format_version is read as one of moco_tf's earlier versions only when every
    key is a setting moco_tf had: another program's config.json is refused, never read as ours."""
    foreign = sorted(set(values) - set(known))
    if foreign:
        raise ConfigError(
            f"not a moco_tf config: no format_version, and key(s) moco_tf never writes ({', '.join(foreign[:3])})"
        )


def _json_values(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"not valid JSON ({error})") from None


# ranges, checked once (NaN included: absl takes "nan")

# Flags of every command line (train, knn, lincls, finetune, plot), by name: one meaning per name.
_POSITIVE_INTS = ("epochs", "batch_size", "queue_size", "dim", "bn_groups", "image_size", "log_every",
                  "keep_checkpoints", "knn_k", "k", "grid_queries", "grid_neighbours", "eval_every", "width")
_NON_NEGATIVE_INTS = ("warmup_epochs", "checkpoint_every", "knn_every", "limit_train", "limit_val")
MAX_INT = 2**31 - 1  # any integer setting above is a typo; seeds end there too
_OPTIONAL_POSITIVE_INTS = ("steps_per_epoch", "max_steps", "steps_per_execution")
_FLOAT_RANGES = {  # name: (low, high, low inclusive, high inclusive, wording)
    "lr": (0.0, math.inf, False, False, "> 0"),
    "temperature": (0.0, math.inf, False, False, "> 0"),
    "moco_momentum": (0.0, 1.0, True, False, "in [0, 1)"),
    "sgd_momentum": (0.0, 1.0, True, False, "in [0, 1)"),
    "weight_decay": (0.0, math.inf, True, False, ">= 0"),
    "knn_t": (0.0, math.inf, False, False, "> 0"),
    "t": (0.0, math.inf, False, False, "> 0"),
    "crop_min_scale": (0.0, 1.0, False, True, "in (0, 1]"),
    "stop_grace_s": (0.0, math.inf, False, False, "> 0"),
    "peer_timeout": (0.0, math.inf, False, False, "> 0"),
}


def _in_range(value: float, low: float, high: float, low_in: bool, high_in: bool) -> bool:
    return (value >= low if low_in else value > low) and (value <= high if high_in else value < high)


def _check_types(sections: list[Any]) -> None:
    """Each setting of the type its field declares (a config built in Python is not checked by a parser)."""
    for section in sections:
        hints = typing.get_type_hints(type(section))
        for field in _fields(type(section)):
            if hints[field.name] is not BackboneSpec:  # a BackboneSpec checks itself
                _typed(field.name, getattr(section, field.name), hints[field.name], flags=True)


def check_ranges(values: Mapping[str, Any]) -> None:
    """The range table above for any settings by flag name (flags of a command line, or values read
    from a file): a ConfigError naming the first one out of range."""
    _check_table(values)


def _check_table(values: Mapping[str, Any]) -> None:
    """The range checks of the table above, for the settings `values` has; choices of Literal fields."""
    for name, value in values.items():
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_INT:
            raise ConfigError(f"--{name} must be at most 2**31 - 1, got {value}")
    for name, (low, high, low_in, high_in, wording) in _FLOAT_RANGES.items():
        if name in values:
            value = values[name]
            if not math.isfinite(value) or not _in_range(value, low, high, low_in, high_in):
                raise ConfigError(f"--{name} must be a finite number {wording}, got {value}")
    for name in _POSITIVE_INTS:
        if values.get(name) is not None and values[name] < 1:
            raise ConfigError(f"--{name} must be positive, got {values[name]}")
    for name in _NON_NEGATIVE_INTS:
        if name in values and values[name] < 0:
            raise ConfigError(f"--{name} must be >= 0, got {values[name]}")
    for name in _OPTIONAL_POSITIVE_INTS:
        if values.get(name) is not None and values[name] < 1:
            raise ConfigError(f"--{name} must be positive (or unset), got {values[name]}")
    for name, choices in (("aug", Augmentation), ("schedule", Schedule), ("mixed_precision", Precision),
                          ("color_stage", ColorStage)):
        if name in values and values[name] not in typing.get_args(choices):
            raise ConfigError(f"--{name} must be one of {', '.join(typing.get_args(choices))}, got {values[name]!r}")


# ----------------------------------------------------------------------------------------------
# flattening, reading and writing


def _shown(value: Any) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, list | tuple) else str(value)


def _is_recipe(section: Any, field: dataclasses.Field) -> bool:
    return field.metadata.get("recipe", type(section).RECIPE)


def _fields(section_type: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(section_type) if f.name != "unrecorded"]


def _leaves(config: Any, sections: tuple[str, ...] | None) -> Iterator[tuple[str, Any, bool]]:
    """(flag name, value, is recipe) for every setting; a BackboneSpec gives arch, width, cifar_stem."""
    for section in [getattr(config, s) for s in sections] if sections else [config]:
        for field in _fields(type(section)):
            value = getattr(section, field.name)
            if isinstance(value, BackboneSpec):
                for name, sub in value.to_dict().items():
                    yield name, sub, _is_recipe(section, field)
            else:
                yield field.name, value, _is_recipe(section, field)


def _section_to_dict(section: Any, unrecorded: frozenset[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in _fields(type(section)):
        value = getattr(section, field.name)
        if isinstance(value, BackboneSpec):
            out[field.name] = value.to_dict()
        elif field.name not in unrecorded:
            out[field.name] = list(value) if isinstance(value, tuple) else value
    return out


def _section_from_dict(
    section_type: type,
    given: Mapping[str, Any],
    section_name: str | None,
    unrecorded: set[str],
    ignore_unknown: bool = False,
    flags: bool = False,
) -> Any:
    """A section from its dict; missing keys keep the defaults and are added to `unrecorded`."""
    hints = typing.get_type_hints(section_type)
    fields = {f.name: f for f in _fields(section_type)}
    unknown = sorted(set(given) - set(fields))
    if unknown and not ignore_unknown:
        where = f"{section_name}.{unknown[0]}" if section_name else unknown[0]
        raise ConfigError(f"unknown config key {where!r} (written by a newer moco_tf?)")
    kwargs = {}
    for name in fields:
        if hints[name] is BackboneSpec:
            if name not in given:
                raise ConfigError("the config records no backbone (arch)")
            kwargs[name] = _backbone(given[name], flags)
        elif name in given:
            kwargs[name] = _typed(name, given[name], hints[name], flags)
        else:
            unrecorded.add(name)
    return section_type(**kwargs)


_BACKBONE_KEYS = ("arch", "width", "cifar_stem")


def _backbone(values: Any, flags: bool) -> BackboneSpec:
    """A BackboneSpec, its errors worded for flags (--width ...) or for a file (width ...)."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"backbone must be an object, got {values!r}")
    if flags:  # absent flags keep the defaults
        values = {**BackboneSpec().to_dict(), **{k: v for k, v in values.items() if v is not None}}
    elif values.get("arch") is None:
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


def _from_flat(values: Mapping[str, Any], flags: bool) -> PretrainConfig:
    """From one object of flag values: flags, or config.json as moco_tf wrote it before format 2
    (`momentum` = the key encoder's m; keys it does not know, such as moco_version, are ignored)."""
    values = dict(values)
    if not flags and "momentum" in values and "moco_momentum" not in values:
        values["moco_momentum"] = values.pop("momentum")
    unrecorded: set[str] = set()
    sections = {}
    for name, section_type in zip(PretrainConfig.SECTIONS, _SECTION_TYPES, strict=True):
        names = {f.name for f in _fields(section_type)}
        # A null where the type has no None (a key an older version wrote as null) counts as absent.
        given = {k: v for k, v in values.items() if k in names and (v is not None or _optional_field(section_type, k))}
        if "backbone" in names:
            given["backbone"] = {k: values[k] for k in _BACKBONE_KEYS if k in values}
        sections[name] = _section_from_dict(section_type, given, name, unrecorded, flags=flags)
    if flags:
        return PretrainConfig(**sections)
    return PretrainConfig(**sections, source=_source(values), unrecorded=_older_files_implied(unrecorded))


# Recipe fields added after config.json files existed, whose defaults are what every run before
# them did: a file that records the augmentation but not these ran with the defaults, so they are
# compared on resume (a resume with --flip=false is refused) instead of left out as unrecorded.
_DEFAULTS_OF_OLDER_FILES = frozenset({"crop_min_scale", "flip", "blur"})


def _older_files_implied(unrecorded: set[str]) -> frozenset[str]:
    if "aug" in unrecorded:  # e.g. a converted checkpoint: its views are unknown altogether
        return frozenset(unrecorded)
    return frozenset(unrecorded - _DEFAULTS_OF_OLDER_FILES)


def _optional_field(section_type: type, name: str) -> bool:
    return _optional(typing.get_type_hints(section_type)[name])


def _optional(hint: Any) -> bool:
    return isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)


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


def _typed(name: str, value: Any, hint: Any, flags: bool) -> Any:
    """`value` as the field's type, or a ConfigError naming the key (the flag with `flags`).
    Ranges, and the choices of a flag, are validate()'s to check."""
    if _optional(hint):
        if value is None:
            return None
        (hint,) = [h for h in typing.get_args(hint) if h is not type(None)]
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    elif typing.get_origin(hint) is Literal:
        ok = value in typing.get_args(hint) or (flags and isinstance(value, str))
    elif typing.get_origin(hint) is tuple:  # tuple[int, ...]
        ok = isinstance(value, list | tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        value = tuple(value) if ok else value
    else:  # pragma: no cover - a new field type needs a rule here
        raise TypeError(f"no rule for {name}: {hint}")
    if not ok:
        raise ConfigError(f"{'--' if flags else ''}{name} must be {_kind(hint)}, got {value!r}")
    return value


def _kind(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(typing.get_args(hint))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, "a list of integers"
    )
