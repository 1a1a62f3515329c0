"""Weighted kNN top-1 / top-5 of a frozen encoder on a labelled dataset:

    python -m moco_tf.knn --pretrained=PATH --dataset=cifar10 [--k=200 --t=0.1] [--retrieval_grid=FILE.png]

--strategy spreads the feature extraction over GPUs, hosts (multi_worker, TF_CONFIG) or a TPU as
for training; --mixed_precision runs the backbone in bfloat16 / float16, the vote in float32.

PATH: a moco_tf model_dir or checkpoint, a TF-Hub export from moco_tf, or a PyTorch checkpoint
(`moco_tf.weights.pretrained`). The classifier is `moco_tf.evaluation.knn`'s.
"""

from __future__ import annotations

from moco_tf import cli  # first: importing it starts TensorFlow quietly (moco_tf.cli)

# isort: split
from absl import flags

from moco_tf import outputs
from moco_tf.cli import evaluation as cli_evaluation
from moco_tf.cli import flags as cli_flags
from moco_tf.data.pipelines import labelled_dataset
from moco_tf.evaluation.knn import evaluate
from moco_tf.evaluation.pictures import write_png
from moco_tf.training import distribute

__all__ = ["main", "run"]

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    cli.reject_extra_arguments(argv)
    cli_flags.check_numbers(FLAGS, image_batch="batch_size")
    if FLAGS.retrieval_grid:  # before the evaluation, not after it
        outputs.check_output(FLAGS.retrieval_grid, "--retrieval_grid", "png")
    with distribute.peer_failures():  # a lost worker of a multi-worker run: one line, not a traceback
        evaluate_from_flags()


def evaluate_from_flags() -> None:
    """Every worker extracts its shard of the features and prints the result; the chief writes the grid."""
    setup = cli_evaluation.setup(FLAGS)
    backbone, info, source = setup.backbone, setup.info, setup.source
    image_size = FLAGS.image_size or info["image_size"]

    def split(name, limit):
        return labelled_dataset(source, name, image_size, FLAGS.batch_size, subset=limit)

    result = evaluate(
        backbone,
        split(source.train_split, FLAGS.limit_train),
        split(source.eval_split, FLAGS.limit_val),
        FLAGS.k,
        FLAGS.t,
        source.num_classes,
        grid_queries=FLAGS.grid_queries if FLAGS.retrieval_grid else 0,
        grid_neighbours=FLAGS.grid_neighbours,
        class_names=source.class_names,
        strategy=setup.strategy,
    )
    print(
        f"kNN (k={FLAGS.k}, t={FLAGS.t}) of {info['description']} on {source.name}: "
        f"top-1 {result.top1:.2f}%  top-5 {result.top5:.2f}%  "
        f"({result.num_val} {source.eval_split} images, bank of {result.num_train} {source.train_split} images)"
    )
    if result.grid is not None and setup.chief:
        print(f"retrieval grid written to {write_png(result.grid, FLAGS.retrieval_grid)}")


def run(argv: list[str] | None = None) -> None:
    """The command line: flags from argv (default sys.argv), user mistakes reported in one line;
    ImportError too (a PyTorch checkpoint without torch installed)."""
    cli_flags.define_knn_flags()
    flags.adopt_module_key_flags(cli_flags)  # listed by --help as this command line's own
    cli.run(main, user_errors=(ImportError,), argv=argv)


if __name__ == "__main__":
    run()
