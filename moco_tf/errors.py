"""The errors moco_tf reports to a user, by what the user can do about them.

- `UserError`: a mistake the user fixes (a flag, a path, a data set); the command lines print its
  one-line message and exit with status 2.
- `RunFailed`: the run could not go on (divergence, full disk, a lost worker); one line, status 1.
- `RunInterrupted`: the run stopped on a signal after saving; one line, status 128 + the signal.

Each module keeps its own, more precise errors (DataError, CheckpointError, ...), subclassing
these, so a caller can catch either the precise error or the whole kind.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake the user fixes; the message says what to change, in one line."""


class RunFailed(RuntimeError):
    """The run could not go on (non-finite loss, full disk); the message says what is saved."""


class RunInterrupted(RuntimeError):
    """The run stopped on a signal after saving; `signum` is the signal's number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
