"""absl flags of every moco_tf command line: train (grouped as the paper's recipe), knn, lincls,
export and convert. Each `define_*` defines its command line's flags once per process."""

from __future__ import annotations

import math

from absl import flags

from moco_tf.errors import UserError
from moco_tf.models.backbones import CIFAR_IMAGE_SIZE, IMAGENET_IMAGE_SIZE, backbone_names
from moco_tf.training.distribute import STRATEGIES

# main_moco.py's --momentum is SGD's; MoCo's own m is another momentum. Defined only to refuse it.
AMBIGUOUS_MOMENTUM = "momentum"
AMBIGUOUS_MOMENTUM_MESSAGE = (
    "--momentum is ambiguous here: use --sgd_momentum (SGD, the official --momentum) or --moco_momentum "
    "(the key encoder's m, the official --moco-m)"
)


def define_train_flags() -> None:
    """Every flag of `moco_tf.train`; defaults are the MoCo v1 ImageNet recipe. Defined once per process."""
    if "arch" in flags.FLAGS:
        return
    # Model
    flags.DEFINE_enum(
        "arch", "resnet50", list(backbone_names()), "Backbone architecture (torchvision ResNet v1.5 layout)."
    )
    flags.DEFINE_bool("cifar_stem", False, "3x3 stride-1 first conv and no max-pool (small images, CIFAR demo).")
    flags.DEFINE_integer(
        "width", 64,
        "Base channels of the ResNet (stages width, 2x, 4x, 8x; features 8x width, x4 with bottlenecks). "
        "64 is the standard torchvision ResNet, the one official weights fit; smaller only for CPU-budget "
        "experiments (e.g. resnet18 --width=16 on CIFAR-10).",
    )
    flags.DEFINE_integer("dim", 128, "Projection dimension of queries and keys.")
    flags.DEFINE_bool("mlp", False, "MoCo v2 projection head: Dense(feature dim) -> ReLU -> Dense(dim).")
    flags.DEFINE_integer("queue_size", 65536, "K, negative keys in the queue; a multiple of the keys per step.")
    flags.DEFINE_float(
        "moco_momentum", 0.999, "m, moving-average momentum of the key encoder, in [0, 1) (official --moco-m)."
    )
    flags.DEFINE_float(AMBIGUOUS_MOMENTUM, None, f"Not accepted: {AMBIGUOUS_MOMENTUM_MESSAGE}.")
    flags.DEFINE_float("temperature", 0.07, "T, softmax temperature of InfoNCE (> 0); v2 uses 0.2.")
    flags.DEFINE_bool("symmetric", False, "Loss on both view orders (official CIFAR demo); enqueues 2 x batch keys.")
    flags.DEFINE_bool("shuffle_bn", True, "Shuffle the key batch across replicas / BN groups before the key encoder.")
    flags.DEFINE_integer("bn_groups", 1, "BatchNorm statistics per group of batch/bn_groups (shuffle BN on 1 device).")
    # Data
    flags.DEFINE_string("dataset", "digits", "digits (embedded), folder, or a TFDS name (imagenet2012, cifar10, ...).")
    flags.DEFINE_string("data_dir", None, "Image folder for --dataset=folder, or the TFDS data_dir (gs:// on TPU).")
    flags.DEFINE_integer(
        "image_size", None,
        f"Side of the square crops fed to the encoders; default: the backbone's ({CIFAR_IMAGE_SIZE} with "
        f"--cifar_stem, else {IMAGENET_IMAGE_SIZE}).",
    )
    flags.DEFINE_enum("aug", "v1", ["v1", "v2"], "Augmentation recipe of MoCo v1 or v2.")
    flags.DEFINE_float(
        "crop_min_scale", 0.2,
        "Smallest random crop, as a share of the image's area, in (0, 1] (official 0.2); larger for tiny "
        "images (the 8x8 digits: 0.5), where a fifth of the image may no longer show the object.",
    )
    flags.DEFINE_bool(
        "flip", True, "Random horizontal flip of the views (official); --noflip where mirror images are other "
        "objects (digits).",
    )
    flags.DEFINE_bool("blur", True, "v2's random Gaussian blur (official); --noblur turns it off (v1 has none).")
    flags.DEFINE_bool(
        "strict_data", False,
        "Read and decode every file of a --dataset=folder before training and stop at the first broken "
        "one. Default: the folder is only listed (start-up independent of its size) and a file that "
        "does not decode is skipped, named in a summary line and counted in TensorBoard.",
    )
    # Optimization
    flags.DEFINE_integer("epochs", 200, "Training epochs.")
    flags.DEFINE_integer("batch_size", 256, "Global batch size, over all replicas and workers.")
    flags.DEFINE_float(
        "lr", 0.03,
        "Learning rate per 256 images, scaled linearly with --batch_size (used: lr x batch_size / 256); "
        "at batch 256 the official --lr.",
    )
    flags.DEFINE_enum("schedule", "step", ["step", "cosine"], "Learning-rate schedule, set per epoch.")
    flags.DEFINE_list("milestones", ["120", "160"], "Epochs where the step schedule multiplies the rate by 0.1.")
    flags.DEFINE_integer("warmup_epochs", 0, "Linear warm-up epochs (not in the official recipes).")
    flags.DEFINE_float("weight_decay", 1e-4, "L2 weight decay, PyTorch style (added to the gradient).")
    flags.DEFINE_float("sgd_momentum", 0.9, "SGD momentum (official --momentum).")
    flags.DEFINE_string(
        "init_from", None,
        "Start both encoders (query and key) from these backbone weights: a moco_tf model_dir or checkpoint "
        "(its projection head too, when it has the same shape), a moco_tf TF-Hub export, or a PyTorch checkpoint "
        "(.pth / .pth.tar). Its --arch, --width and --cifar_stem must be this run's. Optimizer and queue start "
        "fresh. Read at step 0 only: a resume takes the checkpoint's weights. Recorded in config.json.",
    )
    flags.DEFINE_bool(
        "allow_more_epochs", False,
        "Resume (e.g. a finished run) with a larger --epochs: the schedule is recomputed over the new total "
        "(a stretched cosine jumps back up), and config.json records the extension. Without it a changed "
        "--epochs is refused as another recipe.",
    )
    # Hardware
    flags.DEFINE_enum("strategy", "auto", list(STRATEGIES), "tf.distribute strategy; auto picks from the hardware.")
    flags.DEFINE_float(
        "peer_timeout", 300.0,
        "Multi-worker: seconds to wait for every host of TF_CONFIG to start (a host silent for 30 s during "
        "training counts as lost).",
    )
    flags.DEFINE_string("tpu", None, "TPU name or grpc:// address for --strategy=tpu ('local' on a TPU VM).")
    flags.DEFINE_enum("mixed_precision", "none", ["none", "bf16", "fp16"], "Mixed precision (bf16 on TPU).")
    flags.DEFINE_bool("jit_compile", False, "Compile the train step with XLA (one replica per process, GPU/TPU).")
    flags.DEFINE_integer(
        "steps_per_execution", None,
        "Train steps per call from the host into the compiled loop (Keras steps_per_execution), so that a TPU "
        "is not idle between steps. Step lines, TensorBoard scalars, checkpoints and the SIGTERM stop happen "
        "between calls: --log_every and --checkpoint_every must be multiples of it. Unset: on a TPU the "
        "largest divisor of both up to 32, elsewhere 1. Above 1 only on a TPU or a single replica. May change on "
        "a resume.",
    )
    flags.DEFINE_enum(
        "color_stage", "auto", ["auto", "host", "device"],
        "Where the colour augmentation (jitter, grayscale, blur, normalisation) runs: in the input pipeline "
        "on the host's CPU cores, or inside the train step on the accelerator, so the host only decodes, "
        "crops and flips. The views are the same either way. auto: device when the run has a GPU or TPU.",
    )
    flags.DEFINE_integer(
        "seed", None,
        "Seed of weights, queue and data order; makes a run repeatable. Without it the data order's seed is "
        "drawn once and kept in the checkpoint, so a resumed run still continues its own order.",
    )
    flags.DEFINE_bool(
        "deterministic", False,
        "Deterministic TF ops (slower); with --seed a run stopped and resumed ends bit-identical to an "
        "uninterrupted one.",
    )
    # Output
    flags.DEFINE_string("model_dir", None, "Run folder: checkpoints, TensorBoard logs, config. Rerun to resume.")
    flags.DEFINE_integer("knn_every", 10, "kNN monitor every N epochs when the data set has labels (0: off).")
    flags.DEFINE_integer("knn_k", 200, "Neighbours of the kNN monitor.")
    flags.DEFINE_float("knn_t", 0.1, "Temperature of the kNN monitor's vote weights.")
    flags.DEFINE_integer("log_every", 50, "TensorBoard scalars every N steps.")
    flags.DEFINE_integer("checkpoint_every", 1000, "Checkpoint every N steps (and at every epoch end).")
    flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints kept in model_dir.")
    flags.DEFINE_integer("steps_per_epoch", None, "Override steps per epoch (default: images // batch_size).")
    flags.DEFINE_integer("max_steps", None, "Stop after this many steps in total (a short try-out).")
    flags.DEFINE_string(
        "export_dir", None,
        "Export the query backbone as a TF-Hub SavedModel here at the end. An existing folder is replaced only "
        "when it is a moco_tf export of this same run (or any moco_tf export with --overwrite_export); never "
        "the model_dir, a folder around it, or a folder that is not an export.",
    )
    flags.DEFINE_bool("overwrite_export", False, "Let --export_dir replace a moco_tf export of another run.")
    flags.DEFINE_float(
        "stop_grace_s", 25.0,
        "On SIGTERM / SIGINT: seconds allowed to finish the current step and save it before exiting without "
        "(preemptible VMs give about 30 s).",
    )


def refuse_ambiguous_momentum() -> None:
    """A UserError when the train command line got --momentum (ported from main_moco.py?)."""
    if flags.FLAGS[AMBIGUOUS_MOMENTUM].present:
        raise UserError(AMBIGUOUS_MOMENTUM_MESSAGE)


def define_evaluation_flags() -> None:
    """Flags of the CLIs that evaluate a pretrained encoder on a labelled dataset (knn, lincls)."""
    if "pretrained" in flags.FLAGS:
        return
    flags.DEFINE_string(
        "pretrained",
        None,
        "encoder to evaluate: moco_tf model_dir or checkpoint (DIR/ckpt-N), TF-Hub export from moco_tf, "
        "or PyTorch checkpoint (official MoCo .pth.tar, lincls or torchvision)",
    )
    flags.DEFINE_string(
        "dataset", None, "digits, folder (with --data_dir), or a prepared TFDS name (cifar10, imagenet2012)"
    )
    flags.DEFINE_string("data_dir", None, "image folder (--dataset=folder) or TFDS data_dir")
    flags.DEFINE_integer("image_size", None, "crop size; default: the encoder's (32 with the CIFAR stem, else 224)")
    flags.DEFINE_integer("limit_train", 0, "use only N train images, evenly spaced (quick checks); 0: all")
    flags.DEFINE_integer("limit_val", 0, "use only N val images, evenly spaced (quick checks); 0: all")
    flags.DEFINE_bool(
        "strict_data", False,
        "decode every file of a --dataset=folder before evaluating and stop at the first broken one; "
        "default: only list it, and leave out (and name) a file that does not decode",
    )
    # Hardware: as train's flags of the same names.
    flags.DEFINE_enum(
        "strategy", "auto", list(STRATEGIES),
        "tf.distribute strategy; auto picks from the hardware (multi_worker: TF_CONFIG, as for train)",
    )  # fmt: skip
    flags.DEFINE_float("peer_timeout", 300.0, "multi-worker: seconds to wait for every host of TF_CONFIG to start")
    flags.DEFINE_string("tpu", None, "TPU name or grpc:// address for --strategy=tpu ('local' on a TPU VM)")
    flags.DEFINE_enum(
        "mixed_precision", "none", ["none", "bf16", "fp16"],
        "backbone computes in bfloat16 / float16 (bf16 on TPU); features and logits stay float32",
    )  # fmt: skip


def define_knn_flags() -> None:
    """Every flag of `moco_tf.knn`."""
    define_evaluation_flags()
    if "k" in flags.FLAGS:
        return
    flags.DEFINE_integer("k", 200, "number of neighbours")
    flags.DEFINE_float("t", 0.1, "temperature of the neighbour weights exp(similarity / t)")
    flags.DEFINE_integer("batch_size", 256, "images per forward pass, over all replicas and workers")
    flags.DEFINE_string("retrieval_grid", None, "write a PNG of val images and their nearest train images here")
    flags.DEFINE_integer("grid_queries", 8, "val images (rows) in the retrieval grid")
    flags.DEFINE_integer("grid_neighbours", 8, "nearest train images per row of the retrieval grid")


def define_lincls_flags() -> None:
    """Every flag of `moco_tf.lincls`; defaults are the official linear protocol's."""
    define_evaluation_flags()
    if "precompute_features" in flags.FLAGS:
        return
    flags.DEFINE_string("model_dir", None, "checkpoints and results of this linear run; a rerun resumes from it")
    flags.DEFINE_integer("batch_size", 256, "global batch size, over all replicas and workers (official: 256)")
    flags.DEFINE_integer("epochs", 100, "training epochs (official: 100)")
    flags.DEFINE_float(
        "lr", 30.0,
        "SGD learning rate per 256 images, scaled linearly with --batch_size (used: lr x batch_size / 256); "
        "at batch 256 the official --lr (30)",
    )
    flags.DEFINE_float("sgd_momentum", 0.9, "SGD momentum (official --momentum: 0.9)")
    flags.DEFINE_float("weight_decay", 0.0, "SGD weight decay, PyTorch style (official: 0)")
    flags.DEFINE_list(
        "milestones", ["60", "80"], "epochs at which the learning rate drops x0.1 (official --schedule: 60,80)"
    )
    flags.DEFINE_bool(
        "precompute_features",
        False,
        "extract features once (eval transform, no augmentation) and train on them: fast on CPU, "
        "but NOT the official protocol",
    )
    flags.DEFINE_integer(
        "seed", None, "seed of the data order, augmentation and the classifier's initialisation (each epoch's of "
        "(seed, epoch)): with it a run stopped and resumed ends as an uninterrupted one"
    )
    # Names that mean something else in `moco_tf.train`: defined only to be refused in one line.
    for name, use in _LINCLS_REFUSED.items():
        if name not in flags.FLAGS:
            flags.DEFINE_string(name, None, f"not accepted: {use}")


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


def define_finetune_flags() -> None:
    """Every flag of `moco_tf.finetune`; defaults are SimCLR v1's semi-supervised fine-tuning
    (appendix B.5; see moco_tf/evaluation/finetune.py)."""
    define_evaluation_flags()
    if "label_fraction" in flags.FLAGS:
        return
    flags.DEFINE_bool(
        "random_init", False, "train from randomly initialised weights instead of --pretrained (the baseline)"
    )
    flags.DEFINE_enum(
        "arch", "resnet50", list(backbone_names()), "with --random_init: the backbone (--pretrained gives its own)"
    )
    flags.DEFINE_integer("width", 64, "with --random_init: the ResNet's base channels (64: standard)")
    flags.DEFINE_bool("cifar_stem", False, "with --random_init: 3x3 stride-1 first conv, no max-pool (32 px images)")
    flags.DEFINE_float(
        "label_fraction", 1.0,
        "fraction of the train split's labels to train on, in (0, 1]: a class-balanced subset fixed by "
        "--subset_seed; imagenet2012 at 0.01 / 0.1 uses TFDS's imagenet2012_subset/1pct / 10pct (SimCLR's lists)",
    )  # fmt: skip
    flags.DEFINE_integer("subset_seed", 0, "seed of the class-balanced label subset (not used for TFDS's lists)")
    flags.DEFINE_string("model_dir", None, "checkpoints, TensorBoard logs and results of this run; a rerun resumes")
    flags.DEFINE_integer("batch_size", 256, "global batch size, over all replicas and workers (SimCLR: 4096)")
    flags.DEFINE_integer(
        "epochs", None, "training epochs; default: the recipe's for --label_fraction (60 at 0.01, 30 at 0.1)"
    )
    flags.DEFINE_float(
        "lr", 0.05,
        "learning rate per 256 images, scaled linearly with --batch_size (used: lr x batch_size / 256; "
        "SimCLR: 0.05, i.e. 0.8 at batch 4096); decayed by a cosine over the epochs",
    )  # fmt: skip
    flags.DEFINE_float("sgd_momentum", 0.9, "SGD momentum")
    flags.DEFINE_bool("nesterov", True, "Nesterov momentum (SimCLR's fine-tuning)")
    flags.DEFINE_float("weight_decay", 0.0, "SGD weight decay, PyTorch style (SimCLR's fine-tuning: none)")
    flags.DEFINE_integer(
        "seed", None, "seed of the head's initialisation, the data order and augmentation (each epoch's of "
        "(seed, epoch)): with it a run stopped and resumed ends as an uninterrupted one"
    )
    flags.DEFINE_integer("eval_every", 1, "top-1 / top-5 on the eval split every N epochs (and after the last)")
    flags.DEFINE_string(
        "export_dir", None, "at the end, write the fine-tuned backbone + head here as a TF-Hub SavedModel"
    )
    flags.DEFINE_bool("overwrite_export", False, "let --export_dir replace an existing moco_tf export")
    for name, use in _FINETUNE_REFUSED.items():
        if name not in flags.FLAGS:
            flags.DEFINE_string(name, None, f"not accepted: {use}")


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
    flags.DEFINE_string("out", "curves.png", "the PNG to write (an existing file is replaced only if it is a PNG)")
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
    from moco_tf.training import config as config_module

    values = {}
    for flag in flag_values.get_flags_for_module(__name__):
        numeric = isinstance(flag.parser, flags.IntegerParser | flags.FloatParser)
        if numeric and flag.value is not None and not isinstance(flag.value, bool):
            values[flag.name] = flag.value
    config_module.check_ranges(values)
    for name, value in sorted(values.items()):
        if "seed" in name and not 0 <= value < 2**31:
            raise UserError(f"--{name} must be in [0, 2**31), got {value}")
        if not math.isfinite(value) or value < 0:
            raise UserError(f"--{name} must be a finite number >= 0, got {value}")
    if image_batch and values.get("image_size"):
        config_module.check_memory(values["image_size"], values.get(image_batch, 1))
