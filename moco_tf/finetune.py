"""Fine-tune a pretrained encoder (or a random one) with a new linear head on a fraction of the labels:

    python -m moco_tf.finetune --flagfile=configs/cifar10_finetune.flags --pretrained=PATH --model_dir=DIR
    python -m moco_tf.finetune --flagfile=configs/cifar10_finetune.flags --random_init --arch=resnet18 --cifar_stem ...

PATH: a moco_tf model_dir or checkpoint, a TF-Hub export from moco_tf, or a PyTorch checkpoint
(`moco_tf.weights.pretrained`). The recipe (SimCLR v1's semi-supervised fine-tuning: every
weight trains, BatchNorm in training mode, Nesterov SGD, cosine) is `moco_tf.evaluation.finetune`'s;
the labelled subset is `moco_tf.data.subsets`'. --lr is per 256 images (scaled linearly with
--batch_size). A rerun with the same --model_dir resumes; another recipe there is refused.
--export_dir writes the fine-tuned backbone and head as a TF-Hub SavedModel at the end.
"""

from __future__ import annotations

from moco_tf import cli  # first: importing it starts TensorFlow quietly (moco_tf.cli)

# isort: split
import dataclasses
import math
import os

import keras
import tensorflow as tf
from absl import flags

from moco_tf import outputs
from moco_tf.cli import evaluation as cli_evaluation
from moco_tf.cli import flags as cli_flags
from moco_tf.data import sources, subsets
from moco_tf.data.pipelines import labelled_dataset
from moco_tf.evaluation import finetune
from moco_tf.evaluation.linear import write_json
from moco_tf.interop import hub
from moco_tf.models.backbones import BackboneSpec
from moco_tf.training import distribute
from moco_tf.training.evaluation_config import FinetuneConfig
from moco_tf.training.schedules import scaled_lr
from moco_tf.weights.pretrained import load_backbone

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    cli.reject_extra_arguments(argv)
    cli_flags.refuse_finetune_flags()
    cli_flags.check_numbers(FLAGS)
    outputs.check_output_folder(FLAGS.export_dir, "--export_dir")
    outputs.check_run_place(FLAGS.model_dir, "--model_dir")
    config = FinetuneConfig.from_flags(FLAGS)
    config.validate()  # before the strategy: a worker with bad flags must not look like a lost peer
    cli_evaluation.check_model_dir_first(
        config.model_dir, "finetune", FinetuneConfig, finetune.CONFIG_FILE, finetune.RESULTS_FILE, finetune.FINAL_FILE
    )
    if config.export_dir:  # before anything is loaded (run_finetune checks again: tests call it directly)
        protected = [config.model_dir] if config.model_dir else []
        hub.check_export_target(config.export_dir, config.overwrite_export, protected, "--overwrite_export")
    with distribute.peer_failures():
        strategy = distribute.make_strategy(FLAGS.strategy, FLAGS.tpu, FLAGS.peer_timeout)
        run_finetune(config, strategy)


def run_finetune(config: FinetuneConfig, strategy: tf.distribute.Strategy) -> dict[str, float]:
    """What the command line does once its flags are a validated config (tests call it in-process)."""
    chief = distribute.is_chief(strategy)
    source = sources.make_source(config.dataset, config.data_dir, config.strict_data)
    if not source.eval_split:
        raise sources.DataError(f"{source.name} has no val/test split to evaluate on")
    if config.pretrained:
        loaded, info = load_backbone(config.pretrained)
        weights, spec = loaded.model.get_weights(), BackboneSpec.from_dict(info)
        config = dataclasses.replace(config, pretrained=os.path.abspath(config.pretrained), **spec.to_dict())
        described = info["description"]
    else:
        weights, spec = None, BackboneSpec(config.arch, config.width, config.cifar_stem)
        info, described = {}, f"{spec.label}, random init"
    epochs = config.epochs or finetune.default_epochs(config.label_fraction)
    if epochs is None:
        raise cli.UsageError(
            f"the recipe gives epochs for --label_fraction 0.01 and 0.1 only: give --epochs for {config.label_fraction}"
        )
    image_size = config.image_size or info.get("image_size") or spec.default_image_size
    config = dataclasses.replace(config, image_size=image_size, epochs=epochs)
    if config.export_dir:  # before training, not after it
        protected = [config.model_dir] if config.model_dir else []
        hub.check_export_target(config.export_dir, config.overwrite_export, protected, "--overwrite_export")
    own = bool(config.model_dir) and cli_evaluation.is_own_model_dir(config.model_dir, finetune.CONFIG_FILE)
    if config.model_dir:
        cli_evaluation.check_model_dir(config, finetune.CONFIG_FILE, chief)
    else:
        print("no --model_dir: nothing is checkpointed, a rerun starts over")
    train_source = subsets.label_subset(source, config.label_fraction, config.subset_seed, config.data_dir)
    seed = cli_evaluation.shared_seed(strategy, config.seed)
    if seed is not None:
        keras.utils.set_random_seed(seed)  # the head's initialisation
    batch = config.batch_size
    n_train = train_source.num_examples(train_source.train_split)
    def train_ds(epoch: int) -> tf.data.Dataset:  # each epoch's pass of (seed, epoch): exact resume with --seed
        return labelled_dataset(
            train_source, train_source.train_split, image_size, batch, train_aug=True, shuffle=True, seed=seed,
            epoch=epoch,
        )  # fmt: skip

    val_ds = labelled_dataset(source, source.eval_split, image_size, batch, subset=config.limit_val)
    lr = scaled_lr(config.lr, batch)
    print(
        f"fine-tuning {described} on {train_source.name}: {n_train} labelled train images "
        f"({config.label_fraction:g} of the labels), {source.num_classes} classes, image size {image_size}, "
        f"batch {batch}, {epochs} epochs, {'Nesterov ' if config.nesterov else ''}SGD lr {lr:.4g} "
        f"({config.lr} per 256 images) cosine, weight decay {config.weight_decay}"
    )
    model = finetune.build_classifier(
        spec.build, source.num_classes, weights, strategy, sample_shape=(image_size, image_size, 3)
    )
    finetune.finetune(
        model, train_ds, val_ds,
        steps_per_epoch=math.ceil(n_train / batch), epochs=epochs, lr=lr, momentum=config.sgd_momentum,
        nesterov=config.nesterov, weight_decay=config.weight_decay, model_dir=config.model_dir,
        eval_every=config.eval_every, strategy=strategy, chief=chief, repair_broken=own and chief,
    )  # fmt: skip
    final = finetune.evaluate(model, val_ds)
    print(f"final: {source.eval_split} top-1 {final['top1']:.2f}%  top-5 {final['top5']:.2f}%")
    if chief and config.model_dir:
        write_json(os.path.join(config.model_dir, finetune.FINAL_FILE), {**final, "train_images": n_train})
    if chief and config.export_dir:
        record = {**config.recipe_settings(), "source": f"moco_tf finetune {described}",
                  "classes": list(source.class_names)}
        path = hub.export_backbone(
            model.backbone, config.export_dir,
            {**spec.to_dict(), "image_size": image_size, "dataset": config.dataset, "finetune": record},
            classifier=model.fc,
            overwrite=config.overwrite_export, protected=[config.model_dir] if config.model_dir else [],
            overwrite_flag="--overwrite_export",
        )  # fmt: skip
        print(f"exported the fine-tuned backbone and head to {path}")
    return final


def run(argv: list[str] | None = None) -> None:
    """The command line: flags from argv (default sys.argv), user mistakes reported in one line;
    ImportError too (a PyTorch checkpoint without torch installed)."""
    cli_flags.define_finetune_flags()
    flags.adopt_module_key_flags(cli_flags)  # listed by --help as this command line's own
    cli.run(main, user_errors=(ImportError,), argv=argv)


if __name__ == "__main__":
    run()
