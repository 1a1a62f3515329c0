"""Draw a training run's curves (loss, contrastive accuracy, logits, lr, kNN top-1) into one PNG:

    python -m moco_tf.plot --model_dir=DIR --out=curves.png

Reads the TensorBoard event files under DIR/logs (`moco_tf.evaluation.curves`); what healthy
curves look like, and the ones that mean trouble: docs/reading_a_run.md.
"""

from __future__ import annotations

from moco_tf import cli  # first: importing it starts TensorFlow quietly (moco_tf.cli)

# isort: split
import os

from absl import flags

from moco_tf import outputs
from moco_tf.cli import flags as cli_flags
from moco_tf.evaluation import curves

FLAGS = flags.FLAGS
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_out(path: str, model_dir: str | None = None) -> None:
    """Never replaces a user's file (a photo included) nor the run's own: only a PNG that moco_tf
    wrote may be overwritten (`moco_tf.outputs`)."""
    if not path or not path.lower().endswith(".png"):
        raise cli.UsageError(f"--out={path} must be a .png file")
    outputs.check_output(path, "--out", "png", protected=[model_dir] if model_dir else [])


def main(argv: list[str]) -> None:
    cli.reject_extra_arguments(argv)
    if not FLAGS.model_dir:
        raise cli.UsageError("--model_dir is required")
    if not os.path.isdir(FLAGS.model_dir):
        raise cli.UsageError(f"--model_dir={FLAGS.model_dir} is not a folder")
    check_out(FLAGS.out, FLAGS.model_dir)
    cli_flags.check_numbers(FLAGS)
    panels = curves.plot(FLAGS.model_dir, FLAGS.out, FLAGS.title, FLAGS.steps_per_epoch)
    print(f"wrote {FLAGS.out}: {', '.join(panels)}")


def run(argv: list[str] | None = None) -> None:
    """The command line: flags from argv (default sys.argv), user mistakes reported in one line."""
    cli_flags.define_plot_flags()
    flags.adopt_module_key_flags(cli_flags)  # listed by --help as this command line's own
    cli.run(main, argv=argv)


if __name__ == "__main__":
    run()
