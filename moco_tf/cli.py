"""What every moco_tf CLI shares: a user mistake ends in one line on stderr and exit status 2, a run
that cannot go on (divergence, full disk) in one line and status 1, a stop on a signal in one line
and 128 + the signal's number, as shells report it."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UsageError(ValueError):
    """A bad flag value or combination; the message says what to change."""


class RunFailed(RuntimeError):
    """The run could not go on (non-finite loss, full disk); the message says what is saved."""


class RunInterrupted(RuntimeError):
    """The run stopped on a signal after saving; `signum` is the signal's number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def reject_extra_arguments(argv) -> None:
    """absl leaves positional arguments in argv; moco_tf CLIs take flags only."""
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(argv[1:])}")


def run(main: Callable, user_errors: tuple[type[BaseException], ...] = (), argv=None) -> None:
    """absl's app.run(main), reporting `user_errors` (and UsageError) without a traceback."""
    from absl import app

    caught = (UsageError, FileExistsError, FileNotFoundError, NotADirectoryError, PermissionError) + user_errors

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
            print(f"error: {error}", file=sys.stderr, flush=True)
            sys.exit(2)

    app.run(wrapped, argv=argv)
