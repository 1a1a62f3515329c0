"""MoCo pretraining: `python -m moco_tf.train --flagfile=configs/v2.flags`.

The command line: flags (`moco_tf.cli.flags`) into `moco_tf.training.pretrain`, then the TF-Hub
export of --export_dir. Rerunning the same command with the same --model_dir resumes where the
run stopped. When stdout is not a terminal (a log file), progress is one plain line every
--log_every steps instead of Keras's interactive bar.
"""

from __future__ import annotations

from moco_tf import cli  # first: importing it starts TensorFlow quietly (moco_tf.cli)

# isort: split
import os
import sys

import keras
from absl import flags

from moco_tf import outputs
from moco_tf.cli import flags as cli_flags
from moco_tf.data.sources import DataError
from moco_tf.interop import hub
from moco_tf.training import distribute
from moco_tf.training.config import PretrainConfig
from moco_tf.training.distribute import StrategyError
from moco_tf.training.pretrain import pretrain
from moco_tf.training.runlock import RunLockedError

FLAGS = flags.FLAGS

USER_ERRORS = (DataError, StrategyError, RunLockedError, ValueError)  # ConfigError is a cli.USER_ERRORS UserError


def config_from_flags() -> PretrainConfig:
    """The run config of the parsed flags: --recipe's settings (or the defaults), then the flags given."""
    return PretrainConfig.from_flags(FLAGS)


def _export_source(model_dir: str) -> str:
    return f"moco_tf model_dir {os.path.abspath(model_dir)}"


def _check_export_dir(model_dir: str) -> bool:
    """Checks --export_dir before training (not after hours of it); returns whether the export at the
    end may replace what is there: a moco_tf export of this same run, or any moco_tf export with
    --overwrite_export. Never the model_dir, a folder around it, or anything that is not an export."""
    # First pass: refuses the model_dir and non-exports, and puts back an export that a killed
    # replacement had moved aside, so that the second pass sees what is really there.
    hub.check_export_target(FLAGS.export_dir, overwrite=True, protected=(model_dir,))
    overwrite = FLAGS.overwrite_export or hub.export_source(FLAGS.export_dir) == _export_source(model_dir)
    hub.check_export_target(
        FLAGS.export_dir, overwrite=overwrite, protected=(model_dir,), overwrite_flag="--overwrite_export"
    )
    return overwrite


def train_from_flags() -> keras.Model:
    """The whole run from the parsed flags, the export included; returns the trained model."""
    export_overwrite = []  # set on the chief by the check before training

    def check_export(model_dir: str) -> None:
        export_overwrite.append(_check_export_dir(model_dir))

    config = config_from_flags()
    result = pretrain(
        config,
        progress="bar" if sys.stdout.isatty() else "lines",
        before_training=check_export if FLAGS.export_dir else None,
        handle_signals=True,  # SIGTERM / Ctrl-C: finish the step, save, exit 128 + signal
    )
    if FLAGS.export_dir and result.chief:
        extra = {"epochs": result.epochs_done, "dataset": config.data.dataset, "aug": config.data.aug,
                 "moco_version": config.moco_version, "source": _export_source(result.model_dir)}
        path = hub.export_moco(result.model, FLAGS.export_dir, extra, overwrite=export_overwrite[0],
                               protected=(result.model_dir,), overwrite_flag="--overwrite_export")
        print(f"exported the query backbone to {path} (load it with hub.KerasLayer)")
    return result.model


def main(argv: list[str]) -> None:
    cli.reject_extra_arguments(argv)
    cli_flags.refuse_ambiguous_momentum()
    cli_flags.check_numbers(FLAGS)  # the memory of --image_size x --batch_size: PretrainConfig.validate
    outputs.check_output_folder(FLAGS.export_dir, "--export_dir")  # the rest: hub, before training
    outputs.check_run_place(FLAGS.model_dir, "--model_dir")
    with distribute.peer_failures():  # a lost worker of a multi-worker run: one line, not a traceback
        train_from_flags()


def run(argv: list[str] | None = None) -> None:
    """The command line: flags from argv (default sys.argv), user mistakes reported in one line."""
    cli_flags.define_train_flags()
    flags.adopt_module_key_flags(cli_flags)  # listed by --help as this command line's own
    cli.run(main, user_errors=USER_ERRORS, argv=argv)


if __name__ == "__main__":
    run()
