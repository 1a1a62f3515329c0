"""The run config: every setting declared once (flags and fields agree both ways), the named
recipes (and the flagfiles that name them), config.json round trips, the partial record convert
writes, validation messages, what counts as recipe on resume, and the evaluation configs. No
model is built: all fast."""

import dataclasses
import json
import math

import pytest
from absl import flags

from moco_tf.cli import flags as cli_flags
from moco_tf.models.backbones import BackboneSpec
from moco_tf.training import config as cfg
from moco_tf.training import recipes, settings
from moco_tf.training.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    RunMismatchError,
    RuntimeConfig,
)
from moco_tf.training.evaluation_config import FinetuneConfig, LinearConfig

RECIPE = {
    "arch", "width", "cifar_stem", "dim", "mlp", "queue_size", "moco_momentum", "temperature", "symmetric",
    "shuffle_bn", "bn_groups", "dataset", "image_size", "aug", "crop_min_scale", "flip", "blur", "epochs",
    "batch_size", "lr", "schedule",
    "milestones", "warmup_epochs", "weight_decay", "sgd_momentum", "seed",
}


def _flag_values(argv=(), command="train"):
    """absl FlagValues with a command line's flags (as moco_tf.cli.flags generates them), parsed from argv."""
    fv = flags.FlagValues()
    getattr(cli_flags, f"define_{command}_flags")(fv)
    fv([command, *argv])
    return fv


def _config(**flat):
    """A valid small config with some flags changed (by flag name)."""
    base = {"arch": "resnet18", "width": 8, "cifar_stem": True, "queue_size": 64, "batch_size": 32, "epochs": 3}
    return PretrainConfig.from_flags({**base, **flat})


def test_defaults_are_the_quickstart_and_fit_the_digits():
    config = PretrainConfig()
    assert config == PretrainConfig.recipe("quickstart")  # every setting, operational ones too
    assert config.model.backbone == BackboneSpec("resnet18", 16, True) and config.data.image_size == 32
    assert config.data.dataset == "digits" and config.moco_version == "v2"
    config.validate()
    assert PretrainConfig(model=ModelConfig(backbone=BackboneSpec("resnet50"))).data.image_size == 224


def test_the_official_recipes_are_the_papers():
    # He et al. 2019 (main_moco.py's defaults); Chen et al. 2020: --mlp --moco-t 0.2 --aug-plus --cos.
    v1 = PretrainConfig.recipe("moco_v1_imagenet")
    assert v1.model.backbone == BackboneSpec("resnet50", 64, False) and not v1.model.mlp
    assert (v1.model.queue_size, v1.model.moco_momentum, v1.model.temperature) == (65536, 0.999, 0.07)
    assert (v1.optim.lr, v1.optim.batch_size, v1.optim.milestones, v1.optim.schedule) == (0.03, 256, (120, 160), "step")
    assert (v1.optim.epochs, v1.optim.weight_decay, v1.data.image_size, v1.moco_version) == (200, 1e-4, 224, "v1")
    v2 = PretrainConfig.recipe("moco_v2_imagenet")
    assert v2.recipe_settings() == {**v1.recipe_settings(), "mlp": True, "temperature": 0.2, "aug": "v2",
                                    "schedule": "cosine"}
    assert PretrainConfig.recipe("moco_v2_800ep").recipe_settings() == {**v2.recipe_settings(), "epochs": 800}
    demo = PretrainConfig.recipe("cifar10_v2")  # the CIFAR-10 demo: lr 0.06 at batch 512, K 4096, m 0.99, T 0.1
    assert (demo.model.queue_size, demo.model.moco_momentum, demo.model.temperature, demo.model.bn_groups) == (
        4096, 0.99, 0.1, 8)
    assert (demo.optim.lr * demo.optim.batch_size / 256, demo.optim.weight_decay) == (0.06, 5e-4)
    linear = LinearConfig.recipe("lincls_imagenet")  # main_lincls.py
    assert (linear.lr, linear.epochs, linear.milestones, linear.weight_decay) == (30.0, 100, (60, 80), 0.0)
    assert FinetuneConfig.recipe("finetune_imagenet_1pct").epochs == 60
    with pytest.raises(ConfigError, match=r"^--recipe must be one of cifar10_v2, moco_v1_imagenet, .*got 'v3'$"):
        PretrainConfig.recipe("v3")


@pytest.mark.parametrize("name", recipes.names(PretrainConfig))
def test_a_pretraining_recipe_states_every_recipe_setting_and_validates(name):
    config = PretrainConfig.recipe(name)
    assert set(RECIPE) <= set(recipes.settings(PretrainConfig, name))  # independent of the defaults
    config.validate()


@pytest.mark.parametrize(
    "flagfile, command, name",
    [("v1", "train", "moco_v1_imagenet"), ("v2", "train", "moco_v2_imagenet"), ("v2_800ep", "train", "moco_v2_800ep"),
     ("cifar10_v2", "train", "cifar10_v2"), ("quickstart", "train", "quickstart"),
     ("lincls", "lincls", "lincls_imagenet"), ("cifar10_lincls", "lincls", "lincls_cifar10"),
     ("cifar10_finetune", "finetune", "finetune_cifar10_1pct"),
     ("imagenet_finetune_1pct", "finetune", "finetune_imagenet_1pct"),
     ("imagenet_finetune_10pct", "finetune", "finetune_imagenet_10pct")],
)
def test_each_flagfile_is_its_recipe(flagfile, command, name):
    config_type = {"train": PretrainConfig, "lincls": LinearConfig, "finetune": FinetuneConfig}[command]
    parsed = _flag_values([f"--flagfile=configs/{flagfile}.flags", "--seed=3"], command)
    config = config_type.from_flags(parsed)
    assert config.recipe_settings() == config_type.recipe(name).replace(seed=3).recipe_settings()
    text = open(f"configs/{flagfile}.flags").read()
    assert text.startswith("# ") and f"--recipe={name}\n" in text  # commented at its top, names its recipe


# The flags of each command line that are no setting of its config, and why.
_HARDWARE = {"strategy", "peer_timeout", "tpu", "mixed_precision"}  # RuntimeConfig's, not recorded
_COMMAND_LINE_ONLY = {
    "train": {"recipe", "momentum"},  # --momentum: refused as ambiguous
    "lincls": {"recipe", "momentum", "schedule"} | _HARDWARE,  # main_lincls.py's names: refused
    "finetune": {"recipe", "momentum", "schedule", "limit_train"} | _HARDWARE,
}


@pytest.mark.parametrize("command, config", [("train", PretrainConfig()), ("lincls", LinearConfig()),
                                              ("finetune", FinetuneConfig())])
def test_every_flag_is_a_setting_and_every_setting_a_flag(command, config):
    fv = flags.FlagValues()
    getattr(cli_flags, f"define_{command}_flags")(fv)
    defined = {f.name for f in fv.get_flags_for_module(cli_flags.__name__)}
    assert defined - _COMMAND_LINE_ONLY[command] == set(config.flat())
    for leaf in (config.declared() if command == "train" else config.leaves()):
        flag = fv[leaf.name]
        default = tuple(int(v) for v in flag.default) if isinstance(leaf.value, tuple) else flag.default
        role = cli_flags.ROLES[leaf.recipe]
        assert default == leaf.value and flag.help.endswith(f"{leaf.help} [{role}]"), leaf.name  # enum: "<choices>: "
        assert leaf.help and leaf.help.strip() == leaf.help, leaf.name
        choices = settings.literal_choices(leaf.hint)
        if choices:
            assert tuple(flag.parser.enum_values) == choices, leaf.name


def test_one_meaning_per_name_across_the_configs():
    declared = [PretrainConfig().declarations(), LinearConfig().declarations(), FinetuneConfig().declarations()]
    for name in set().union(*declared):
        found = [d[name] for d in declared if name in d]
        assert len({settings.required(leaf.hint) for leaf in found}) == 1, name
        checks = {leaf.check for leaf in found} - {None}
        assert len(checks) <= 1 or checks == {settings.POSITIVE, settings.POSITIVE_OR_UNSET}, name


def test_replace_changes_settings_by_flag_name():
    config = PretrainConfig().replace(epochs=2, queue_size=512, model_dir="runs/try")
    assert (config.optim.epochs, config.model.queue_size, config.runtime.model_dir) == (2, 512, "runs/try")
    assert config.model.dim == 128 and config.optim.lr == 0.12  # the rest as it was
    big = PretrainConfig().replace(arch="resnet50", width=64, cifar_stem=False)
    assert big.data.image_size == 224  # the default size followed the backbone
    assert PretrainConfig().replace(cifar_stem=False, image_size=64).data.image_size == 64
    with pytest.raises(ConfigError, match=r"^unknown setting 'momentum'"):
        PretrainConfig().replace(momentum=0.9)
    with pytest.raises(ConfigError, match=r"^--lr must be a number, got '0.1'$"):
        PretrainConfig().replace(lr="0.1")
    with pytest.raises(ConfigError, match=r"^--width must be an integer, got None$"):
        PretrainConfig().replace(width=None)
    with pytest.raises(ConfigError, match=r"^model must be a ModelConfig, got \{'dim': 3\}$"):
        PretrainConfig().replace(model={"dim": 3})


def test_json_round_trip_of_every_section():
    config = PretrainConfig(
        model=ModelConfig(BackboneSpec("resnet34", 32, True), dim=64, mlp=True, queue_size=1024, moco_momentum=0.99,
                          temperature=0.2, symmetric=True, shuffle_bn=False, bn_groups=4),
        data=DataConfig("folder", 48, "v2", data_dir="/data/photos", strict_data=True),
        optim=OptimConfig(10, 64, 0.06, "cosine", (3, 6), 1, 5e-4, 0.8),
        runtime=RuntimeConfig(seed=3, model_dir="runs/x", deterministic=True, strategy="mirrored", max_steps=50,
                              knn_t=0.05, export_dir="export/x", overwrite_export=True, stop_grace_s=10.0),
        source="PyTorch checkpoint moco_v2_800ep_pretrain.pth.tar (official layout)",
    )
    text = config.to_json()
    written = json.loads(text)
    assert written["format_version"] == 2 and written["moco_version"] == "v2"
    assert written["model"]["backbone"] == {"arch": "resnet34", "width": 32, "cifar_stem": True}
    assert written["optim"]["milestones"] == [3, 6] and written["runtime"]["seed"] == 3
    back = PretrainConfig.from_json(text)
    assert back == config and back.unrecorded == frozenset()
    assert back.to_json() == text


def test_a_converted_model_dir_compares_only_what_it_recorded():
    # What convert.convert_to_model_dir writes for a CIFAR checkpoint: no optimisation recipe.
    converted = {
        "arch": "resnet18", "dim": 128, "queue_size": 4096, "moco_momentum": 0.99, "temperature": 0.2, "mlp": True,
        "shuffle_bn": True, "bn_groups": 1, "symmetric": False, "cifar_stem": True, "width": 64,
        "moco_version": "v2", "dataset": "cifar10", "image_size": 32,
        "source": "PyTorch checkpoint demo.pth (official layout)",
    }
    saved = PretrainConfig.from_record(converted)
    assert {"epochs", "lr", "batch_size", "schedule", "milestones", "seed", "aug"} <= saved.unrecorded
    assert saved.source == "PyTorch checkpoint demo.pth (official layout)"
    given = {k: v for k, v in converted.items() if k not in ("moco_version", "source")}
    ours = PretrainConfig.from_flags({**given, "epochs": 5, "lr": 0.06, "aug": "v2"})
    cfg.check_same_run(saved, ours, "runs/c")  # the user's own optimisation recipe goes on from the weights
    with pytest.raises(RunMismatchError, match=r"--temperature=0.2 \(now 0.1\)"):
        cfg.check_same_run(saved, PretrainConfig.from_record({**converted, "temperature": 0.1}), "runs/c")
    # Written back, it stays partial: the defaults do not become a recorded recipe.
    again = PretrainConfig.from_json(saved.to_json())
    assert again == saved and again.unrecorded == saved.unrecorded and "epochs" not in json.loads(saved.to_json())


def test_resume_refusal_names_each_flag_and_both_values():
    saved = _config(temperature=0.2, shuffle_bn=False)
    with pytest.raises(RunMismatchError) as error:
        cfg.check_same_run(saved, _config(temperature=0.1, shuffle_bn=True), "runs/a")
    assert str(error.value) == (
        "model_dir runs/a holds another run: --temperature=0.2 (now 0.1), --shuffle_bn=False (now True); "
        "rerun with its values or use a new --model_dir"
    )
    changed = _config(width=16, milestones="30,40", seed=1, moco_momentum=0.9, sgd_momentum=0.8, dataset="cifar10")
    assert cfg.recipe_differences(_config(), changed) == [
        "--width=8 (now 16)", "--moco_momentum=0.99 (now 0.9)", "--dataset=digits (now cifar10)",
        "--milestones=120,160 (now 30,40)", "--sgd_momentum=0.9 (now 0.8)", "--seed=None (now 1)",
    ]


def test_operational_settings_may_change_on_resume():
    assert set(_config().recipe_settings()) == RECIPE
    operational = dict(
        data_dir="/moved/data", strict_data=True, model_dir="elsewhere", deterministic=True, strategy="mirrored",
        tpu="local", mixed_precision="bf16", jit_compile=True, steps_per_execution=5, checkpoint_every=5,
        keep_checkpoints=9, log_every=1,
        knn_every=0, knn_k=20, knn_t=0.5, steps_per_epoch=4, max_steps=7, export_dir="e", overwrite_export=True,
        stop_grace_s=3.0, peer_timeout=60.0, init_from="/weights/run", allow_more_epochs=True, color_stage="device",
    )
    assert set(operational) == set(PretrainConfig().flat()) - RECIPE  # every one of them
    cfg.check_same_run(_config(), _config(**operational), "runs/a")


def test_from_flags_reads_absl_lists_and_takes_what_was_given_over_the_recipe():
    config = PretrainConfig.from_flags(_flag_values(["--milestones=30,40", "--arch=resnet50", "--lr=0.06"]))
    assert config.optim.milestones == (30, 40) and config.optim.lr == 0.06
    assert config.model.backbone == BackboneSpec("resnet50", 16, True) and config.data.image_size == 32
    assert PretrainConfig.from_flags({}) == PretrainConfig() == PretrainConfig.from_flags(_flag_values())
    with pytest.raises(ConfigError, match="--momentum is ambiguous: --moco_momentum is the key encoder's m"):
        PretrainConfig.from_flags({"momentum": 0.9})
    assert PretrainConfig.from_flags({"cifar_stem": False, "arch": "resnet18"}).data.image_size == 224
    given = PretrainConfig.from_flags(_flag_values(["--recipe=cifar10_v2", "--width=16", "--epochs=10"]))
    assert given == PretrainConfig.recipe("cifar10_v2").replace(width=16, epochs=10)
    # A flag given at the default's value still overrides the recipe.
    v1_small_queue = PretrainConfig.from_flags(_flag_values(["--recipe=moco_v1_imagenet", "--queue_size=256"]))
    assert v1_small_queue.model.queue_size == 256


@pytest.mark.parametrize(
    "flat, message",
    [
        ({"lr": math.nan}, "--lr must be a finite number > 0, got nan"),
        ({"lr": -0.1}, "--lr must be a finite number > 0, got -0.1"),
        ({"lr": math.inf}, "--lr must be a finite number > 0, got inf"),
        ({"temperature": 0.0}, "--temperature must be a finite number > 0, got 0.0"),
        ({"moco_momentum": 1.0}, "--moco_momentum must be a finite number in [0, 1), got 1.0"),
        ({"sgd_momentum": 1.5}, "--sgd_momentum must be a finite number in [0, 1), got 1.5"),
        ({"weight_decay": -1e-4}, "--weight_decay must be a finite number >= 0, got -0.0001"),
        ({"knn_t": 0.0}, "--knn_t must be a finite number > 0, got 0.0"),
        ({"stop_grace_s": -1.0}, "--stop_grace_s must be a finite number > 0, got -1.0"),
        ({"checkpoint_every": -1}, "--checkpoint_every must be >= 0, got -1"),
        ({"max_steps": -5}, "--max_steps must be positive (or unset), got -5"),
        ({"steps_per_epoch": -3}, "--steps_per_epoch must be positive (or unset), got -3"),
        ({"keep_checkpoints": 0}, "--keep_checkpoints must be positive, got 0"),
        ({"epochs": 0}, "--epochs must be positive, got 0"),
        ({"width": 0}, "--width must be positive, got 0"),
        ({"arch": "resnet20"}, "unknown arch 'resnet20'; choose one of resnet18, resnet34, resnet50, resnet101"),
        ({"milestones": ["a", "b"]}, "--milestones must be epochs (integers), got a,b"),
        ({"milestones": "-5"}, "--milestones must be positive epochs, got -5"),
        ({"warmup_epochs": 10}, "--warmup_epochs 10 is more than --epochs 3"),
        ({"seed": -1}, "--seed must be in [0, 2**31), got -1"),
        ({"queue_size": 100},
         "--queue_size 100 is not a multiple of the keys enqueued per step (32 = global batch 32)"),
        ({"queue_size": 96, "symmetric": True}, "(64 = global batch 32 x 2 (symmetric))"),
        ({"image_size": 8}, "--image_size 8 is too small (at least 16)"),
        ({"schedule": "linear"}, "--schedule must be one of step, cosine, got 'linear'"),
        ({"aug": "v3"}, "--aug must be one of v1, v2, got 'v3'"),
        ({"mixed_precision": "fp8"}, "--mixed_precision must be one of none, bf16, fp16, got 'fp8'"),
        ({"strategy": "gpu"}, "--strategy must be one of auto, default, mirrored, multi_worker, tpu, got 'gpu'"),
        ({"epochs": 2.5}, "--epochs must be an integer, got 2.5"),
    ],
)
def test_validation_messages(flat, message):
    with pytest.raises(ConfigError) as error:
        _config(**flat).validate()
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_config_built_in_python_is_type_checked():
    with pytest.raises(ConfigError, match=r"^--lr must be a number, got '0.1'$"):
        PretrainConfig(optim=OptimConfig(lr="0.1")).validate()
    with pytest.raises(ConfigError, match=r"^--shuffle_bn must be true or false, got 1$"):
        PretrainConfig(model=ModelConfig(shuffle_bn=1)).validate()
    with pytest.raises(ConfigError, match=r"^--milestones must be epochs \(integers\), got 1.5$"):
        PretrainConfig.from_flags({"milestones": [1.5]})


def test_checks_that_need_the_devices_or_the_data():
    config = _config(batch_size=32, bn_groups=4)
    config.check_replicas(2)
    with pytest.raises(ConfigError, match=r"^--batch_size 32 is not divisible by the 3 replicas$"):
        config.check_replicas(3)
    with pytest.raises(ConfigError, match=r"^the per-replica batch 2 is not divisible by --bn_groups$"):
        config.check_replicas(16)
    assert config.steps_per_epoch(1797, "digits") == 56
    assert _config(steps_per_epoch=2).steps_per_epoch(1797, "digits") == 2
    with pytest.raises(ConfigError, match=r"^digits has 20 images, fewer than one --batch_size$"):
        config.steps_per_epoch(20, "digits")
    assert config.total_steps(56) == 3 * 56 and _config(max_steps=5).total_steps(56) == 5


def test_default_model_dir_names_data_backbone_and_augmentation():
    assert _config(dataset="cifar10", aug="v2").default_model_dir() == "runs/cifar10-resnet18w8-v2"
    assert PretrainConfig().default_model_dir() == "runs/digits-resnet18w16-v2"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["model"].update(dim="128"), "dim must be an integer, got '128'"),
        (lambda d: d["optim"].update(lr=None), "lr must be a number, got None"),
        (lambda d: d["optim"].update(milestones=[1.5]), "milestones must be a list of integers, got [1.5]"),
        (lambda d: d["data"].update(aug="v9"), "aug must be one of v1, v2, got 'v9'"),
        (lambda d: d["model"]["backbone"].update(width=0), "width must be positive, got 0"),
        (lambda d: d["model"]["backbone"].update(arch="vgg"), "unknown arch 'vgg'"),
        (lambda d: d["model"].pop("backbone"), "the config records no backbone (arch)"),
        (lambda d: d["runtime"].update(gpus=8), "unknown config key 'runtime.gpus' (written by a newer moco_tf?)"),
        (lambda d: d.update(format_version=3), "config format_version 3 is not 2 (another moco_tf version)"),
    ],
)
def test_files_that_do_not_hold_a_valid_config(change, message):
    written = PretrainConfig().to_dict()
    change(written)
    with pytest.raises(ConfigError) as error:
        PretrainConfig.from_dict(written)
    assert message in str(error.value)


def test_unreadable_json_and_files_that_are_not_moco_tf_configs():
    with pytest.raises(ConfigError, match="not valid JSON"):
        PretrainConfig.from_json('{"arch": "resnet18", ')
    with pytest.raises(ConfigError, match="must be a JSON object, got list"):
        PretrainConfig.from_json("[1, 2]")
    with pytest.raises(ConfigError, match="^not a moco_tf config: no format_version$"):
        PretrainConfig.from_dict({"arch": "resnet18", "width": 8})
    with pytest.raises(ConfigError, match="^not a moco_tf config: no format_version$"):
        LinearConfig.from_dict({"pretrained": "/r", "lr": 30})
    twice = PretrainConfig().to_json().replace('"epochs": 15,', '"epochs": 15, "epochs": 99,')
    with pytest.raises(ConfigError, match="^key 'epochs' is given twice$"):
        PretrainConfig.from_json(twice)


# ----------------------------------------------------------------------------------------------
# the linear protocol


def test_linear_config_round_trips_and_compares_its_recipe():
    saved = LinearConfig(pretrained="/r/run", dataset="cifar10", image_size=32, precompute_features=True, lr=30.0)
    assert LinearConfig.from_json(saved.to_json()) == saved
    now = LinearConfig.from_flags(_flag_values(
        ["--pretrained=/r/run", "--dataset=cifar10", "--image_size=32", "--precompute_features", "--lr=10",
         "--milestones=30,40", "--model_dir=m"], "lincls"))
    with pytest.raises(RunMismatchError) as error:
        cfg.check_same_run(saved, now, "runs/l")
    assert str(error.value) == (
        "model_dir runs/l holds another linear classifier run: --lr=30.0 (now 10.0), --milestones=60,80 (now 30,40); "
        "rerun with its values or use a new --model_dir"
    )
    assert LinearConfig.from_json(now.to_json()) == now
    assert cfg.recipe_differences(now, dataclasses.replace(now, model_dir="n", data_dir="d", strict_data=True)) == []


@pytest.mark.parametrize(
    "flat, message",
    [
        ({"lr": 0.0}, "--lr must be a finite number > 0, got 0.0"),
        ({"epochs": 0}, "--epochs must be positive, got 0"),
        ({"sgd_momentum": 1.0}, "--sgd_momentum must be a finite number in [0, 1), got 1.0"),
        ({"milestones": "60,x"}, "--milestones must be epochs (integers), got 60,x"),
        ({"limit_val": -1}, "--limit_val must be >= 0, got -1"),
        ({"image_size": 4}, "--image_size 4 is too small (at least 16)"),
    ],
)
def test_linear_validation_messages(flat, message):
    with pytest.raises(ConfigError) as error:
        LinearConfig.from_flags(flat).validate()
    assert str(error.value) == message
