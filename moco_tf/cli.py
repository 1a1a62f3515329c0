"""What every moco_tf CLI shares: a user mistake ends in one line on stderr and exit status 2."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UsageError(ValueError):
    """A bad flag value or combination; the message says what to change."""


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
        except caught as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    app.run(wrapped, argv=argv)
