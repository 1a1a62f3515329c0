"""Bring official PyTorch MoCo (and torchvision ResNet) weights to moco_tf:

    python -m moco_tf.convert --torch_checkpoint=moco_v2_800ep_pretrain.pth.tar \
        (--export_dir=export/moco_v2_r50 | --model_dir=runs/from_torch) [--overwrite]

--export_dir writes a TF-Hub export; --model_dir a moco_tf model_dir that training and lincls go
on from. What is read, and how, is `moco_tf.weights.torch_checkpoint`'s; the conversions are
`moco_tf.interop.torch`'s.
"""

from __future__ import annotations

from moco_tf import cli  # first: importing it starts TensorFlow quietly (moco_tf.cli)

# isort: split
from absl import flags

from moco_tf import outputs
from moco_tf.cli import flags as cli_flags
from moco_tf.interop.torch import convert_to_export, convert_to_model_dir

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    cli.reject_extra_arguments(argv)
    if not FLAGS.torch_checkpoint:
        raise cli.UsageError("--torch_checkpoint is required")
    if bool(FLAGS.export_dir) == bool(FLAGS.model_dir):
        raise cli.UsageError("give exactly one of --export_dir and --model_dir")
    outputs.check_output_folder(FLAGS.export_dir, "--export_dir")
    outputs.check_run_place(FLAGS.model_dir, "--model_dir")
    if FLAGS.export_dir:
        path = convert_to_export(FLAGS.torch_checkpoint, FLAGS.export_dir, FLAGS.overwrite)
        print(f"exported {path}")
    else:
        path = convert_to_model_dir(FLAGS.torch_checkpoint, FLAGS.model_dir, FLAGS.overwrite)
        print(f"wrote model_dir {path}")


def run(argv: list[str] | None = None) -> None:
    """The command line: flags from argv (default sys.argv), user mistakes reported in one line;
    ImportError too (no torch installed: its message says how to install it)."""
    cli_flags.define_convert_flags()
    flags.adopt_module_key_flags(cli_flags)  # listed by --help as this command line's own
    cli.run(main, user_errors=(ImportError,), argv=argv)


if __name__ == "__main__":
    run()
