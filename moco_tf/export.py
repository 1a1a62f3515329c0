"""Export a trained MoCo encoder where users transfer it:

    python -m moco_tf.export --model_dir=SOURCE --export_dir=TARGET [--format=hub] [--overwrite]

SOURCE (--model_dir, or --pretrained): anything `--pretrained` takes: a moco_tf model_dir (its
newest checkpoint) or one checkpoint in it (DIR/checkpoints/ckpt-N), a TF-Hub export from
moco_tf, or a PyTorch checkpoint (official MoCo .pth.tar, torchvision state_dict).

--format:
- hub (default): a TF-Hub reusable SavedModel folder (`moco_tf.interop.hub`);
- keras_hub: a KerasHub preset folder (`moco_tf.interop.keras_hub`; extra `keras_hub`);
- pth: an official MoCo `.pth.tar` file (`moco_tf.interop.torch`; extra `torch`);
- onnx: an ONNX model file, opset 17 (`moco_tf.interop.onnx`; extra `onnx`).
Every format follows the export rules of `moco_tf.atomic_write` (staging + atomic replace; only
what moco_tf wrote is ever replaced, and only with --overwrite).
"""

from __future__ import annotations

from moco_tf import cli  # first: importing it starts TensorFlow quietly (moco_tf.cli)

# isort: split
import os

from absl import flags

from moco_tf import outputs
from moco_tf.cli import flags as cli_flags

FLAGS = flags.FLAGS


def _source() -> str:
    given = [f"--{name}" for name in ("model_dir", "pretrained") if getattr(FLAGS, name)]
    if len(given) != 1 or not FLAGS.export_dir:
        raise cli.UsageError(
            "both --model_dir and --export_dir are required "
            "(--pretrained may stand for --model_dir; give one of the two)"
        )
    return FLAGS.model_dir or FLAGS.pretrained


def export(source: str, target: str, format: str = "hub", overwrite: bool = False) -> str:
    """Write the encoder at `source` to `target` in `format`; returns target. The target is
    checked before the (slow) source is read."""
    from moco_tf.interop import transfer

    protected = transfer.source_protected(source)
    if format == "hub":
        from moco_tf.interop import hub

        source_norm = os.path.normpath(source)
        if os.path.isdir(source_norm) and not hub.is_export(source_norm) or os.path.isfile(source_norm + ".index"):
            return hub.export_model_dir(source, target, overwrite=overwrite)  # model_dir / checkpoint: as always
        hub.check_export_target(target, overwrite, protected)
        encoder = transfer.load_encoder(source)
        return hub.export_backbone(
            encoder.backbone, target, encoder.config, head=encoder.head, overwrite=overwrite, protected=protected
        )
    if format == "keras_hub":
        from moco_tf.interop import keras_hub

        keras_hub.check_target(target, overwrite, protected)
        return keras_hub.write_preset(transfer.load_encoder(source), target, overwrite)
    if format == "pth":
        from moco_tf.interop import torch as to_torch

        to_torch.check_pth_target(target, overwrite, protected)
        return to_torch.write_official_checkpoint(transfer.load_encoder(source), target, overwrite)
    if format == "onnx":
        from moco_tf.interop import onnx

        onnx.check_target(target, overwrite, protected)
        return onnx.write_onnx(transfer.load_encoder(source), target, overwrite)
    raise cli.UsageError(f"--format={format}: give hub, keras_hub, pth or onnx")


def main(argv: list[str]) -> None:
    cli.reject_extra_arguments(argv)
    source = _source()
    outputs.check_output_folder(FLAGS.export_dir, "--export_dir")
    path = export(source, FLAGS.export_dir, FLAGS.format, FLAGS.overwrite)
    print(f"exported {path} ({FLAGS.format})")


def run(argv: list[str] | None = None) -> None:
    """The command line: flags from argv (default sys.argv), user mistakes reported in one line
    (a missing optional dependency too: its message names the pip command)."""
    cli_flags.define_export_flags()
    flags.adopt_module_key_flags(cli_flags)  # listed by --help as this command line's own
    cli.run(main, user_errors=(ImportError,), argv=argv)


if __name__ == "__main__":
    run()
