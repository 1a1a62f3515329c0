"""absl flags of every moco_tf command line. train's, lincls's and finetune's are generated from
their config classes (moco_tf.training.config, .evaluation_config: each setting's default, help
and bounds declared once, on its field); knn, export, convert and plot declare their few own
here. Each `define_*` defines its command line's flags once per process."""

from __future__ import annotations

import math
from collections.abc import Sequence

from absl import flags

from moco_tf.errors import UserError
from moco_tf.models.backbones import backbone_names
from moco_tf.training import config, recipes, settings
from moco_tf.training.config import PretrainConfig
from moco_tf.training.evaluation_config import FinetuneConfig, LinearConfig

# main_moco.py's --momentum is SGD's; MoCo's own m is another momentum. Defined only to refuse it.
AMBIGUOUS_MOMENTUM = "momentum"
AMBIGUOUS_MOMENTUM_MESSAGE = (
    "--momentum is ambiguous here: use --sgd_momentum (SGD, the official --momentum) or --moco_momentum "
    "(the key encoder's m, the official --moco-m)"
)


def _define(leaf: settings.Leaf, fv: flags.FlagValues) -> None:
    """One absl flag from a setting's declaration: its type, default, choices, help and role."""
    hint, default, name = settings.required(leaf.hint), leaf.value, leaf.name
    text = f"{leaf.help} [{ROLES[leaf.recipe]}]"
    choices = settings.literal_choices(leaf.hint)
    if choices:
        flags.DEFINE_enum(name, default, list(choices), text, flag_values=fv)
    elif name == "arch":
        flags.DEFINE_enum(name, default, list(backbone_names()), text, flag_values=fv)
    elif hint is bool:
        flags.DEFINE_bool(name, default, text, flag_values=fv)
    elif hint is int:
        flags.DEFINE_integer(name, default, text, flag_values=fv)
    elif hint is float:
        flags.DEFINE_float(name, default, text, flag_values=fv)
    elif hint is str:
        flags.DEFINE_string(name, default, text, flag_values=fv)
    else:  # tuple[int, ...]
        flags.DEFINE_list(name, [str(v) for v in default], text, flag_values=fv)
    _DECLARED[name] = leaf


# How --help shows a setting's role (a resumed run must keep its recipe settings).
ROLES = {True: "recipe: a resume keeps it", False: "operational: may change on a resume"}
# Flag name -> its declaration, for check_numbers: every flag defined from a config field, and the
# command lines' own numeric flags with a bound. Overwritten by each define: the current command's.
_DECLARED: dict[str, settings.Leaf] = {}


def _own(name: str, check: settings.Check) -> None:
    _DECLARED[name] = settings.Leaf(name, None, float, False, "", check)


def _define_config(declared: Sequence[settings.Leaf], fv: flags.FlagValues, names: Sequence[str] | None = None) -> None:
    """The flags of a config's settings (or of the settings named), defaults and help from their fields."""
    for leaf in declared:
        if (names is None or leaf.name in names) and leaf.name not in fv:
            _define(leaf, fv)


def _define_recipe(config_type: type, fv: flags.FlagValues) -> None:
    flags.DEFINE_enum(
        "recipe", None, recipes.names(config_type),
        "A named recipe (moco_tf/training/recipes.py) whose settings replace the defaults; flags given beside it "
        "override it. [config.json records each setting, not the name]", flag_values=fv,
    )


def define_train_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """Every flag of `moco_tf.train`, generated from PretrainConfig; defaults are the quickstart's."""
    if "arch" in fv:
        return
    _define_recipe(PretrainConfig, fv)
    _define_config(PretrainConfig.declared(), fv)
    flags.DEFINE_float(AMBIGUOUS_MOMENTUM, None, f"Not accepted: {AMBIGUOUS_MOMENTUM_MESSAGE}.", flag_values=fv)


def refuse_ambiguous_momentum() -> None:
    """A UserError when the train command line got --momentum (ported from main_moco.py?)."""
    if flags.FLAGS[AMBIGUOUS_MOMENTUM].present:
        raise UserError(AMBIGUOUS_MOMENTUM_MESSAGE)


# The flags of the evaluation command lines that are no setting of their config: the hardware,
# as train's flags of the same names.
_HARDWARE = ("strategy", "peer_timeout", "tpu", "mixed_precision")
# knn's flags that are LinearConfig's settings of the same names.
_KNN_SETTINGS = ("pretrained", "dataset", "data_dir", "image_size", "limit_train", "limit_val", "strict_data")


def define_hardware_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """--strategy, --peer_timeout, --tpu, --mixed_precision of the evaluation command lines (knn,
    lincls, finetune): train's settings of those names."""
    _define_config(PretrainConfig.declared(), fv, _HARDWARE)


def define_knn_flags() -> None:
    """Every flag of `moco_tf.knn`."""
    if "k" in flags.FLAGS:
        return
    _define_config(LinearConfig().leaves(), flags.FLAGS, _KNN_SETTINGS)
    define_hardware_flags()
    flags.DEFINE_integer("k", 200, "number of neighbours")
    flags.DEFINE_float("t", 0.1, "temperature of the neighbour weights exp(similarity / t)")
    flags.DEFINE_integer("batch_size", 256, "images per forward pass, over all replicas and workers")
    flags.DEFINE_string("retrieval_grid", None, "write a PNG of val images and their nearest train images here")
    flags.DEFINE_integer("grid_queries", 8, "val images (rows) in the retrieval grid")
    flags.DEFINE_integer("grid_neighbours", 8, "nearest train images per row of the retrieval grid")
    for name in ("k", "batch_size", "grid_queries", "grid_neighbours"):
        _own(name, settings.POSITIVE)
    _own("t", settings.POSITIVE_FLOAT)


def define_lincls_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """Every flag of `moco_tf.lincls`, generated from LinearConfig; defaults are the official protocol's."""
    if "precompute_features" in fv:
        return
    _define_recipe(LinearConfig, fv)
    _define_config(LinearConfig().leaves(), fv)
    define_hardware_flags(fv)
    # Names that mean something else in `moco_tf.train`: defined only to be refused in one line.
    for name, use in _LINCLS_REFUSED.items():
        if name not in fv:
            flags.DEFINE_string(name, None, f"not accepted: {use}", flag_values=fv)


# lincls flag names whose meaning differs in another command line -> what to use instead.
_LINCLS_REFUSED = {
    "momentum": "use --sgd_momentum (the official --momentum; train's key encoder m is --moco_momentum)",
    "schedule": "use --milestones=60,80 (the official --schedule; train's --schedule is step|cosine)",
}


def refuse_renamed_lincls_flags() -> None:
    """A UserError when `moco_tf.lincls` got --momentum or --schedule (ported from main_lincls.py?)."""
    for name, use in _LINCLS_REFUSED.items():
        if flags.FLAGS[name].present:
            raise UserError(f"--{name} is not a lincls flag: {use}")


def define_finetune_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """Every flag of `moco_tf.finetune`, generated from FinetuneConfig; defaults are SimCLR v1's
    semi-supervised fine-tuning (appendix B.5; see moco_tf/evaluation/finetune.py)."""
    if "label_fraction" in fv:
        return
    _define_recipe(FinetuneConfig, fv)
    _define_config(FinetuneConfig().leaves(), fv)
    define_hardware_flags(fv)
    flags.DEFINE_integer("limit_train", None, "not accepted: use --label_fraction", flag_values=fv)
    for name, use in _FINETUNE_REFUSED.items():
        if name not in fv:
            flags.DEFINE_string(name, None, f"not accepted: {use}", flag_values=fv)


_FINETUNE_REFUSED = {
    "momentum": "use --sgd_momentum (train's key encoder m is --moco_momentum)",
    "schedule": "the rate follows a cosine over --epochs (SimCLR's fine-tuning); there is no other schedule",
}


def refuse_finetune_flags() -> None:
    """A UserError for flags of the evaluation set that fine-tuning does not take."""
    for name, use in _FINETUNE_REFUSED.items():
        if flags.FLAGS[name].present:
            raise UserError(f"--{name} is not a finetune flag: {use}")
    if flags.FLAGS["limit_train"].present:
        raise UserError("--limit_train is not a finetune flag: use --label_fraction")
    if flags.FLAGS.mixed_precision != "none":
        raise UserError("--mixed_precision is not supported by finetune yet: drop it (float32)")
    if flags.FLAGS.random_init and flags.FLAGS.pretrained:
        raise UserError("--random_init and --pretrained exclude each other: give one")
    if not flags.FLAGS.random_init:
        given = [f"--{n}" for n in ("arch", "width", "cifar_stem") if flags.FLAGS[n].present]
        if given:
            raise UserError(f"{', '.join(given)} only go with --random_init: --pretrained fixes the backbone")


def define_plot_flags() -> None:
    """Every flag of `moco_tf.plot`."""
    if "out" in flags.FLAGS:
        return
    flags.DEFINE_string("model_dir", None, "a training run's folder (its logs/ are read)")
    flags.DEFINE_string("out", "curves.png", "the PNG to write (an existing file is replaced only if moco_tf wrote it)")
    flags.DEFINE_string("title", None, "title above the panels (default: the model_dir's name)")
    flags.DEFINE_integer(
        "steps_per_epoch", None, "steps per epoch, to place per-epoch values (default: from config.json and the data)"
    )


def define_export_flags() -> None:
    """Every flag of `moco_tf.export`."""
    if "export_dir" in flags.FLAGS:
        return
    flags.DEFINE_string(
        "model_dir", None,
        "encoder to export: a moco_tf model_dir or checkpoint (DIR/checkpoints/ckpt-N), a TF-Hub export from "
        "moco_tf or a PyTorch checkpoint (.pth / .pth.tar): anything --pretrained takes",
    )
    flags.DEFINE_string("pretrained", None, "the same as --model_dir (give one of the two)")
    flags.DEFINE_string(
        "export_dir", None,
        "what to create: a folder for --format=hub / keras_hub (export/moco_v2_r50), a file for --format=pth "
        "(moco_v2_r50.pth.tar) / onnx (moco_v2_r50.onnx)",
    )
    flags.DEFINE_enum(
        "format", "hub", ["hub", "keras_hub", "pth", "onnx"],
        "hub: TF-Hub SavedModel; keras_hub: KerasHub preset (ResNetBackbone / ImageClassifier.from_preset); "
        "pth: official MoCo .pth.tar (PyTorch, detectron2); onnx: ONNX model (opset 17)",
    )
    flags.DEFINE_bool("overwrite", False, "replace an existing export_dir (only one moco_tf wrote)")


def define_convert_flags() -> None:
    """Every flag of `moco_tf.convert`."""
    if "torch_checkpoint" in flags.FLAGS:
        return
    flags.DEFINE_string("torch_checkpoint", None, "official MoCo .pth.tar, lincls or torchvision checkpoint")
    flags.DEFINE_string("export_dir", None, "write a TF-Hub export here")
    flags.DEFINE_string("model_dir", None, "write a moco_tf model_dir here (training / lincls resume)")
    flags.DEFINE_bool("overwrite", False, "replace an existing export_dir / model_dir")


def check_numbers(flag_values: flags.FlagValues = flags.FLAGS, image_batch: str | None = None) -> None:
    """Every integer and float flag of this command line (walked from the definitions above, so a
    new flag is covered) against one rule, before anything is read or built: training.config's
    range table where it names the flag; otherwise finite and >= 0 (no moco_tf number means
    anything below 0), seeds in [0, 2**31), nothing above 2**31 - 1. With `image_batch` (the
    batch flag's name) the batch of --image_size images must also fit in memory."""
    values = {}
    for flag in flag_values.get_flags_for_module(__name__):
        numeric = isinstance(flag.parser, flags.IntegerParser | flags.FloatParser)
        if numeric and flag.value is not None and not isinstance(flag.value, bool):
            values[flag.name] = flag.value
    config.check_named(values, {name: leaf for name, leaf in _DECLARED.items() if name in values})
    for name, value in sorted(values.items()):
        if "seed" in name and not 0 <= value < 2**31:
            raise UserError(f"--{name} must be in [0, 2**31), got {value}")
        if not math.isfinite(value) or value < 0:
            raise UserError(f"--{name} must be a finite number >= 0, got {value}")
    if image_batch and values.get("image_size"):
        config.check_memory(values["image_size"], values.get(image_batch, 1))
