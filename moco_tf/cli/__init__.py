"""What every moco_tf command line shares: a user mistake ends in one line on stderr and exit
status 2, a run that cannot go on (divergence, full disk) in one line and status 1, a stop on a
signal in one line and 128 + the signal's number, as shells report it.

The command lines (`python -m moco_tf.train`, knn, lincls, export, convert) parse their flags
(`moco_tf.cli.flags`), call the library and print; the library never imports this package.
Each command line imports this package first: importing it starts TensorFlow quietly (below),
and `run` shows the library's log records as the command lines print (`moco_tf.reporting`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from moco_tf import reporting
from moco_tf._quiet_tf_startup import import_tensorflow_quietly
from moco_tf.errors import RunFailed, RunInterrupted, UserError

# At import, before any module of a command line imports TensorFlow (none of the above does):
# keeps TensorFlow's start-up notices (and, with no GPU driver, the certain cuInit failure) off
# the screen unless TF_CPP_MIN_LOG_LEVEL is set; see the module. The library never does this.
import_tensorflow_quietly()

__all__ = ["USER_ERRORS", "RunFailed", "RunInterrupted", "UsageError", "reject_extra_arguments", "run"]


class UsageError(UserError):
    """A bad flag value or combination; the message says what to change."""


# User mistakes reported in one line instead of a traceback. ValueError: the library's argument
# checks (a bad value reaches it only from a flag); the OS errors: paths the user gave.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError, FileExistsError, FileNotFoundError, NotADirectoryError, PermissionError, ValueError,
)


# Set (to anything) to get the traceback of a one-line error, e.g. to report a moco_tf bug.
TRACEBACK_VARIABLE = "MOCO_TF_TRACEBACK"


def reject_extra_arguments(argv: Sequence[str]) -> None:
    """absl leaves positional arguments in argv; moco_tf CLIs take flags only."""
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(argv[1:])}")


def run(
    main: Callable[[list[str]], None],
    user_errors: tuple[type[BaseException], ...] = (),
    argv: list[str] | None = None,
) -> None:
    """absl's app.run(main), reporting USER_ERRORS and `user_errors` in one line (status 2),
    RunFailed in one line (status 1) and RunInterrupted in one line (status 128 + signal); the
    library's log records meanwhile on stdout (INFO) and stderr ("warning: ...")."""
    from absl import app, logging

    logging.set_verbosity(logging.WARNING)  # no INFO lines of tf.distribute, checkpoints and SavedModels
    caught = USER_ERRORS + tuple(user_errors)

    def wrapped(args):
        try:
            main(args)
        except RunInterrupted as stop:
            print(str(stop), file=sys.stderr, flush=True)
            sys.exit(128 + stop.signum)
        except RunFailed as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            sys.exit(1)
        except caught as error:
            if os.environ.get(TRACEBACK_VARIABLE):  # a bug that looks like a user mistake: show where
                raise
            print(f"error: {error}", file=sys.stderr, flush=True)
            sys.exit(2)

    try:
        with reporting.console():  # the library's log records, printed as the command lines print
            app.run(wrapped, argv=argv)
    except (UnicodeError, OSError) as error:  # reading the flags: a --flagfile of bytes, not text
        if os.environ.get(TRACEBACK_VARIABLE):
            raise
        given = [a.split("=", 1)[1] for a in (argv or sys.argv) if a.startswith(("--flagfile=", "-flagfile="))]
        where = f" of --flagfile={', '.join(given)}" if given else ""
        print(f"error: cannot read the flags{where}: {_one_line(error)}", file=sys.stderr, flush=True)
        sys.exit(2)


def _one_line(error: BaseException) -> str:
    if isinstance(error, UnicodeDecodeError):  # absl does not say which file: the bytes it could not read
        return f"not UTF-8 text (byte {error.object[error.start:error.start + 1]!r} at offset {error.start})"
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
