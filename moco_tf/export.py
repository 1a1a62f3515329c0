"""Export a trained MoCo backbone as a reusable TF-Hub SavedModel:

    python -m moco_tf.export --model_dir=DIR --export_dir=export/NAME [--overwrite]

--model_dir: a moco_tf model_dir (its newest checkpoint) or one checkpoint in it (DIR/checkpoints/ckpt-N).
The export's format and its safety rules (what may be replaced) are `moco_tf.interop.hub`'s.
"""

from __future__ import annotations

from absl import flags

from moco_tf import cli, outputs
from moco_tf.cli import flags as cli_flags
from moco_tf.interop.hub import export_model_dir

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    cli.reject_extra_arguments(argv)
    if not FLAGS.model_dir or not FLAGS.export_dir:
        raise cli.UsageError("both --model_dir and --export_dir are required")
    outputs.check_output_folder(FLAGS.export_dir, "--export_dir")
    path = export_model_dir(FLAGS.model_dir, FLAGS.export_dir, overwrite=FLAGS.overwrite)
    print(f"exported {path}")


def run(argv: list[str] | None = None) -> None:
    """The command line: flags from argv (default sys.argv), user mistakes reported in one line."""
    cli_flags.define_export_flags()
    flags.adopt_module_key_flags(cli_flags)  # listed by --help as this command line's own
    cli.run(main, argv=argv)


if __name__ == "__main__":
    run()
