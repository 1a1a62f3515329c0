"""The run config: config.json round trips, old flat config.json files (with and without width, and
the partial ones convert wrote), validation messages, what counts as recipe on resume, and the
linear protocol's config. No model is built: all fast."""

import dataclasses
import json
import math

import pytest
from absl import flags

from moco_tf.models.backbones import BackboneSpec
from moco_tf.training import config as cfg
from moco_tf.training.config import (
    ConfigError,
    DataConfig,
    LinearConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    RunMismatchError,
    RuntimeConfig,
)

# config.json as moco_tf wrote it before the structured format (configs/cifar10_v2.flags' run).
OLD_FLAT = {
    "arch": "resnet18", "cifar_stem": True, "width": 16, "dim": 128, "mlp": True, "queue_size": 4096,
    "momentum": 0.99, "temperature": 0.1, "symmetric": False, "shuffle_bn": True, "bn_groups": 8,
    "dataset": "cifar10", "image_size": 32, "aug": "v2", "epochs": 200, "batch_size": 512, "lr": 0.03,
    "schedule": "cosine", "warmup_epochs": 0, "weight_decay": 5e-4, "sgd_momentum": 0.9, "seed": 7,
    "milestones": [120, 160], "moco_version": "v2",
}
# The same run on the command line, with the train CLI's flag names.
ARGV = [
    "--arch=resnet18", "--cifar_stem", "--width=16", "--mlp", "--queue_size=4096", "--moco_momentum=0.99",
    "--temperature=0.1", "--bn_groups=8", "--dataset=cifar10", "--image_size=32", "--aug=v2", "--batch_size=512",
    "--schedule=cosine", "--weight_decay=5e-4", "--seed=7",
]
RECIPE = {
    "arch", "width", "cifar_stem", "dim", "mlp", "queue_size", "moco_momentum", "temperature", "symmetric",
    "shuffle_bn", "bn_groups", "dataset", "image_size", "aug", "crop_min_scale", "flip", "blur", "epochs",
    "batch_size", "lr", "schedule",
    "milestones", "warmup_epochs", "weight_decay", "sgd_momentum", "seed",
}


def _flag_values(argv=()):
    """absl FlagValues with the train CLI's flags (names and defaults), parsed from argv."""
    fv = flags.FlagValues()
    for name, default in PretrainConfig().flat().items():
        if isinstance(default, bool):
            flags.DEFINE_bool(name, default, "", flag_values=fv)
        elif name == "milestones":
            flags.DEFINE_list(name, [str(m) for m in default], "", flag_values=fv)
        elif isinstance(default, float) or name in ("knn_t", "stop_grace_s"):
            flags.DEFINE_float(name, default, "", flag_values=fv)
        elif isinstance(default, int) or name in ("seed", "steps_per_epoch", "max_steps"):
            flags.DEFINE_integer(name, default, "", flag_values=fv)
        else:
            flags.DEFINE_string(name, default, "", flag_values=fv)
    fv(["train", *argv])
    return fv


def _config(**flat):
    """A valid small config with some flags changed (by flag name)."""
    base = {"arch": "resnet18", "width": 8, "cifar_stem": True, "queue_size": 64, "batch_size": 32, "epochs": 3}
    return PretrainConfig.from_flags({**base, **flat})


def test_defaults_are_the_v1_imagenet_recipe():
    config = PretrainConfig()
    assert config.model.backbone == BackboneSpec("resnet50", 64, False)
    assert (config.model.queue_size, config.model.moco_momentum, config.model.temperature) == (65536, 0.999, 0.07)
    assert (config.optim.lr, config.optim.batch_size, config.optim.milestones) == (0.03, 256, (120, 160))
    assert config.data.image_size == 224 and config.moco_version == "v1"
    assert PretrainConfig(model=ModelConfig(backbone=BackboneSpec("resnet18", cifar_stem=True))).data.image_size == 32
    config.validate()


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


@pytest.mark.parametrize("width", [16, None])
def test_old_flat_config_reads_as_the_equivalent_flags(width):
    old = dict(OLD_FLAT)
    argv = list(ARGV)
    if width is None:  # written before --width existed: the standard ResNet
        del old["width"]
        argv.remove("--width=16")
    from_file = PretrainConfig.from_json(json.dumps(old))
    from_flags = PretrainConfig.from_flags(_flag_values(argv))
    assert from_file == from_flags
    assert from_file.model.backbone.width == (width or 64)
    assert from_file.model.moco_momentum == 0.99  # the old key `momentum` is the key encoder's m
    assert cfg.recipe_differences(from_file, from_flags) == []
    # Nothing of the recipe is missing from an old file; the operational settings were not recorded.
    assert from_file.unrecorded == set(PretrainConfig().flat()) - RECIPE | {"data_dir", "strict_data"}
    # The view options came later; their defaults are what such a run did, so they are compared.
    changed = PretrainConfig.from_flags(_flag_values([*argv, "--noflip"]))
    assert cfg.recipe_differences(from_file, changed) == ["--flip=True (now False)"]


def test_a_converted_model_dir_compares_only_what_it_recorded():
    # What convert.convert_to_model_dir writes for a CIFAR checkpoint: no optimisation recipe.
    converted = {
        "arch": "resnet18", "dim": 128, "queue_size": 4096, "momentum": 0.99, "temperature": 0.2, "mlp": True,
        "shuffle_bn": True, "bn_groups": 1, "symmetric": False, "cifar_stem": True, "width": 64,
        "moco_version": "v2", "dataset": "cifar10", "image_size": 32,
        "source": "PyTorch checkpoint demo.pth (official layout)",
    }
    saved = PretrainConfig.from_dict(converted)
    assert {"epochs", "lr", "batch_size", "schedule", "milestones", "seed", "aug"} <= saved.unrecorded
    assert saved.source == "PyTorch checkpoint demo.pth (official layout)"
    ours = PretrainConfig.from_flags({**converted, "moco_momentum": 0.99, "epochs": 5, "lr": 0.06, "aug": "v2"})
    cfg.check_same_run(saved, ours, "runs/c")  # the user's own optimisation recipe goes on from the weights
    with pytest.raises(RunMismatchError, match=r"--temperature=0.2 \(now 0.1\)"):
        cfg.check_same_run(saved, PretrainConfig.from_dict({**converted, "temperature": 0.1}), "runs/c")
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
        "--width=8 (now 16)", "--moco_momentum=0.999 (now 0.9)", "--dataset=digits (now cifar10)",
        "--milestones=120,160 (now 30,40)", "--sgd_momentum=0.9 (now 0.8)", "--seed=None (now 1)",
    ]


def test_operational_settings_may_change_on_resume():
    assert set(_config().recipe()) == RECIPE
    operational = dict(
        data_dir="/moved/data", strict_data=True, model_dir="elsewhere", deterministic=True, strategy="mirrored",
        tpu="local", mixed_precision="bf16", jit_compile=True, steps_per_execution=5, checkpoint_every=5,
        keep_checkpoints=9, log_every=1,
        knn_every=0, knn_k=20, knn_t=0.5, steps_per_epoch=4, max_steps=7, export_dir="e", overwrite_export=True,
        stop_grace_s=3.0, peer_timeout=60.0, init_from="/weights/run", allow_more_epochs=True, color_stage="device",
    )
    assert set(operational) == set(PretrainConfig().flat()) - RECIPE  # every one of them
    cfg.check_same_run(_config(), _config(**operational), "runs/a")


def test_from_flags_reads_absl_lists_and_defaults_missing_flags():
    config = PretrainConfig.from_flags(_flag_values(["--milestones=30,40", "--arch=resnet18", "--lr=0.06"]))
    assert config.optim.milestones == (30, 40) and config.optim.lr == 0.06
    assert config.model.backbone == BackboneSpec("resnet18") and config.data.image_size == 224  # the flag's default
    assert PretrainConfig.from_flags({}) == PretrainConfig()
    with pytest.raises(ConfigError, match="--momentum is ambiguous: --moco_momentum is the key encoder's m"):
        PretrainConfig.from_flags({"momentum": 0.9})
    assert PretrainConfig.from_flags({"cifar_stem": True, "arch": "resnet18"}).data.image_size == 32


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
    assert PretrainConfig().default_model_dir() == "runs/digits-resnet50-v1"


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


def test_unreadable_json_and_flat_files_without_arch():
    with pytest.raises(ConfigError, match="not valid JSON"):
        PretrainConfig.from_json('{"arch": "resnet18", ')
    with pytest.raises(ConfigError, match="must be a JSON object, got list"):
        PretrainConfig.from_json("[1, 2]")
    with pytest.raises(ConfigError, match="records no arch"):
        PretrainConfig.from_dict({"width": 8})


# ----------------------------------------------------------------------------------------------
# the linear protocol


def test_linear_config_reads_old_files_and_compares_its_recipe():
    # lincls_config.json before the structured format: the then resume keys only.
    old = {"pretrained": "/r/run", "dataset": "cifar10", "image_size": 32, "precompute_features": True,
           "batch_size": 256, "lr": 30, "epochs": 100}
    saved = LinearConfig.from_dict(old)
    assert saved.lr == 30.0 and {"milestones", "sgd_momentum", "weight_decay", "seed"} <= saved.unrecorded
    now = LinearConfig.from_flags({**old, "lr": 10.0, "milestones": ["30", "40"], "model_dir": "m", "verbosity": 0})
    with pytest.raises(RunMismatchError) as error:
        cfg.check_same_run(saved, now, "runs/l")
    assert str(error.value) == (
        "model_dir runs/l holds another linear classifier run: --lr=30.0 (now 10.0); "
        "rerun with its values or use a new --model_dir"
    )
    assert LinearConfig.from_json(now.to_json()) == now
    assert cfg.recipe_differences(now, dataclasses.replace(now, model_dir="n", data_dir="d", strict_data=True)) == []
    assert cfg.recipe_differences(now, dataclasses.replace(now, milestones=(60, 80))) == [
        "--milestones=30,40 (now 60,80)"
    ]


def test_old_linear_config_lr_was_used_as_given_and_reads_per_256():
    # Before format_version, lincls used --lr as given (main_lincls.py): 7.5 at batch 64 is today's
    # --lr=30 per 256 images, so the same run resumed with today's flags compares equal.
    old = {"pretrained": "/r/run", "dataset": "cifar10", "image_size": 32, "precompute_features": True,
           "batch_size": 64, "lr": 7.5, "epochs": 100}
    saved = LinearConfig.from_dict(old)
    assert saved.lr == 30.0
    now = LinearConfig.from_flags({**old, "lr": 30.0, "model_dir": "m"})
    assert cfg.recipe_differences(saved, now) == []
    # Today's file records per-256 already: read as written.
    assert LinearConfig.from_json(now.to_json()).lr == 30.0


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
