"""How moco_tf reports what it does: Python's `logging`, under the logger "moco_tf".

The library never prints its notices: what happens (resuming, a checkpoint found broken, kNN
results, where the run is saved) is logged at INFO, what the user should look at at WARNING.
Progress output (Keras's bar, the plain per-step lines, the epoch summary) is not a notice: the
training callbacks write it themselves, as Keras writes its bar.

`console()` shows these records as the command lines have always printed them: INFO lines as they
are on stdout, warnings on stderr as "warning: ...", errors as "error: ..." (a record logged with
`extra=AS_IS` keeps its text unprefixed). The command lines hold it for their whole run.
`pretrain()` and the evaluation protocols hold it for their call when nothing would show their
records (no handler on "moco_tf" or above it: a plain script, a notebook), so that a caller sees
what a run does without setting up logging; wherever logging is configured, its configuration
decides, e.g. `logging.getLogger("moco_tf").setLevel(logging.INFO)` to see the INFO lines.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

LOGGER = "moco_tf"
# extra= of a record whose text is whole as it is (no "warning: " before it on the console).
AS_IS = {"as_is": True}


class ConsoleHandler(logging.Handler):
    """INFO and below on stdout as they are; WARNING and above on stderr, prefixed by their level.

    The streams are looked up at each record (a caller may redirect them), and no handler-wide lock
    is held: each stream has its own, and a record for stderr (a stop's last words, written from a
    timer thread right before the process exits) must not wait for a write to a blocked stdout."""

    def handle(self, record: logging.LogRecord) -> bool:
        passed = bool(self.filter(record))
        if passed:
            self.emit(record)
        return passed

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.levelno < logging.WARNING:
                stream = sys.stdout
            else:
                stream = sys.stderr
                if not getattr(record, "as_is", False):
                    message = ("error: " if record.levelno >= logging.ERROR else "warning: ") + message
            stream.write(message + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging's rule: a failed report never ends the program
            self.handleError(record)


@contextlib.contextmanager
def console() -> Iterator[None]:
    """Shows the "moco_tf" records (INFO and above) with a ConsoleHandler only, for the block."""
    logger = logging.getLogger(LOGGER)
    handler = ConsoleHandler()
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # not again through a root handler (absl's, in the command lines)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def _configured() -> bool:
    """Whether a handler the caller set up would see a "moco_tf" record. absl's own handler does
    not count: absl installs it on the root logger by itself (TensorFlow logs through absl while
    saving a checkpoint), so its presence says nothing about what the caller wants to see."""
    logger: logging.Logger | None = logging.getLogger(LOGGER)
    while logger is not None:
        if any(type(h).__name__ != "ABSLHandler" for h in logger.handlers):
            return True
        if not logger.propagate:
            return False
        logger = logger.parent
    return False


@contextlib.contextmanager
def shown_unless_configured() -> Iterator[None]:
    """`console()` for the block when no handler would see a "moco_tf" record; else nothing.
    Also a decorator: `@shown_unless_configured()`."""
    if _configured():
        yield
        return
    with console():
        yield
