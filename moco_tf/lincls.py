"""The linear classification protocol of MoCo (main_lincls.py) on a frozen encoder:

    python -m moco_tf.lincls --flagfile=configs/lincls.flags --pretrained=PATH --model_dir=DIR

PATH: a moco_tf model_dir or checkpoint, a TF-Hub export from moco_tf, or a PyTorch checkpoint
(`moco_tf.weights.pretrained`). --lr is per 256 images (scaled linearly with --batch_size, as in
pretraining): at the official batch 256 it is main_lincls.py's --lr. The protocol (frozen
backbone in inference mode, SGD on a fresh Dense layer, checkpoints per epoch, the final check
that the backbone did not move) is `moco_tf.evaluation.linear`'s; see there. A rerun with the same --model_dir resumes.
--precompute_features trains on features extracted once, without augmentation: much faster on
a CPU, but not the official protocol, so its numbers are labelled as such. --strategy trains
over GPUs, hosts (multi_worker, TF_CONFIG) or a TPU as for pretraining, --batch_size being the
global batch; --mixed_precision runs the frozen backbone in bfloat16 / float16, the classifier in
float32.
"""

from __future__ import annotations

from moco_tf import cli  # first: importing it starts TensorFlow quietly (moco_tf.cli)

# isort: split
import dataclasses
import functools
import math
import os
import sys

from absl import flags

from moco_tf import outputs
from moco_tf.cli import evaluation as cli_evaluation
from moco_tf.cli import flags as cli_flags
from moco_tf.data.pipelines import labelled_dataset
from moco_tf.evaluation import linear
from moco_tf.training import distribute
from moco_tf.training.evaluation_config import LinearConfig
from moco_tf.training.schedules import scaled_lr

FLAGS = flags.FLAGS
FINAL_FILE = "lincls_final.json"


def main(argv: list[str]) -> None:
    cli.reject_extra_arguments(argv)
    cli_flags.refuse_renamed_lincls_flags()
    cli_flags.check_numbers(FLAGS)
    config = LinearConfig.from_flags(FLAGS)
    outputs.check_run_place(config.model_dir, "--model_dir")
    config.validate()  # before the strategy: a worker with bad flags must not look like a lost peer
    cli_evaluation.check_model_dir_first(
        config.model_dir, "lincls", LinearConfig, linear.CONFIG_FILE, linear.RESULTS_FILE, FINAL_FILE
    )
    with distribute.peer_failures():  # a lost worker of a multi-worker run: one line, not a traceback
        train_from_flags(config)


def train_from_flags(config: LinearConfig) -> None:
    """Every worker trains its shard of each batch; the chief writes the config, checkpoints and results."""
    setup = cli_evaluation.setup(FLAGS, config)
    backbone, info, source, strategy = setup.backbone, setup.info, setup.source, setup.strategy
    milestones = sorted(config.milestones)
    image_size = config.image_size or info["image_size"]
    config = dataclasses.replace(config, image_size=image_size, pretrained=os.path.abspath(config.pretrained))
    own = bool(config.model_dir) and cli_evaluation.is_own_model_dir(config.model_dir, linear.CONFIG_FILE)
    if config.model_dir:
        cli_evaluation.check_model_dir(config, linear.CONFIG_FILE, setup.chief)
    else:
        print("no --model_dir: nothing is checkpointed, a rerun starts over")
    batch = config.batch_size
    seed = cli_evaluation.shared_seed(strategy, config.seed)

    def split(name, limit, train, epoch=0):
        return labelled_dataset(
            source, name, image_size, batch, train_aug=train and not config.precompute_features,
            shuffle=train and not config.precompute_features, seed=seed, subset=limit, epoch=epoch,
        )  # fmt: skip

    # Each epoch's pass built anew (order and crops of (seed, epoch)): exact resume with --seed.
    train_ds = functools.partial(split, source.train_split, config.limit_train, True)
    val_ds = split(source.eval_split, config.limit_val, False)
    n_train = min(config.limit_train or math.inf, source.num_examples(source.train_split))
    classifier_backbone = backbone
    if config.precompute_features:
        print("precomputing features (no augmentation: not the official protocol)")
        train_ds, n_train = linear.feature_dataset(
            backbone, train_ds(0), batch, shuffle=True, seed=seed, strategy=strategy, per_epoch=True
        )
        val_ds, _ = linear.feature_dataset(backbone, val_ds, batch, shuffle=False, strategy=strategy)
        classifier_backbone = None
    lr = scaled_lr(config.lr, batch)  # --lr is per 256 images, as in pretraining
    protocol = "precomputed features, no augmentation" if config.precompute_features else "official protocol"
    print(
        f"linear classification ({protocol}) of {info['description']} on {source.name}: "
        f"{n_train} train images, {source.num_classes} classes, image size {image_size}, batch {batch}, "
        f"{config.epochs} epochs, lr {lr:.4g} ({config.lr} per 256 images) x0.1 at epochs {milestones}"
    )
    model, _ = linear.train_linear(
        classifier_backbone,
        train_ds,
        val_ds,
        source.num_classes,
        steps_per_epoch=math.ceil(n_train / batch),
        epochs=config.epochs,
        lr=lr,
        momentum=config.sgd_momentum,
        weight_decay=config.weight_decay,
        milestones=milestones,
        model_dir=config.model_dir,
        strategy=strategy,
        chief=setup.chief,
        seed=seed,
        repair_broken=own and setup.chief,
    )
    final = linear.evaluate(model, val_ds)
    print(f"final: val top-1 {final['top1']:.2f}%  top-5 {final['top5']:.2f}%  ({protocol})")
    try:
        count = linear.sanity_check(backbone, cli_evaluation.load_reference(config.pretrained), config.pretrained)
    except linear.BackboneChangedError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    print(f"sanity check passed: all {count} backbone variables (BN statistics included) equal {config.pretrained}")
    if config.model_dir and setup.chief:
        linear.write_json(os.path.join(config.model_dir, FINAL_FILE), {**final, "protocol": protocol})


def run(argv: list[str] | None = None) -> None:
    """The command line: flags from argv (default sys.argv), user mistakes reported in one line;
    ImportError too (a PyTorch checkpoint without torch installed)."""
    cli_flags.define_lincls_flags()
    flags.adopt_module_key_flags(cli_flags)  # listed by --help as this command line's own
    cli.run(main, user_errors=(ImportError,), argv=argv)


if __name__ == "__main__":
    run()
