"""moco_tf.reporting: the library logs, the command lines print those records as they always
printed them (INFO on stdout as is, "warning: ..." / "error: ..." on stderr), and a library call
shows them itself only where nothing else would."""

import logging

import pytest

from moco_tf import cli, reporting
from moco_tf.reporting import AS_IS

log = logging.getLogger("moco_tf.test_reporting")


def _notices() -> None:
    log.info("resuming from step 3")
    log.warning("the queue is larger than the data set")
    log.warning("SIGTERM received: saving a checkpoint", extra=AS_IS)
    log.error("no step ended within 25 s of SIGTERM")
    log.debug("not shown")


EXPECTED_OUT = "resuming from step 3\n"
EXPECTED_ERR = (
    "warning: the queue is larger than the data set\n"
    "SIGTERM received: saving a checkpoint\n"
    "error: no step ended within 25 s of SIGTERM\n"
)


def _logger_state():
    logger = logging.getLogger(reporting.LOGGER)
    return list(logger.handlers), logger.level, logger.propagate


def test_console_prints_as_the_command_lines_print_and_puts_everything_back(capsys):
    before = _logger_state()
    with reporting.console():
        _notices()
    assert capsys.readouterr() == (EXPECTED_OUT, EXPECTED_ERR)
    assert _logger_state() == before


def test_a_command_line_shows_the_library_records(capsys):
    """cli.run (absl's app.run, whose handler on the root logger would print them again in its own
    format) prints them once, as the library printed them before it logged."""
    before = _logger_state()
    with pytest.raises(SystemExit) as done:
        cli.run(lambda argv: _notices(), argv=["moco_tf.test"])
    assert done.value.code in (None, 0)
    assert capsys.readouterr() == (EXPECTED_OUT, EXPECTED_ERR)
    assert _logger_state() == before


def test_a_library_call_shows_its_records_only_where_logging_is_not_configured(capsys, caplog, monkeypatch):
    call = reporting.shown_unless_configured()(_notices)
    # Configured (here: pytest's handlers on the root logger): its configuration decides.
    caplog.set_level(logging.INFO, logger="moco_tf")
    call()
    assert capsys.readouterr() == ("", "")
    messages = [r.getMessage() for r in caplog.records]
    assert messages[:2] == ["resuming from step 3", "the queue is larger than the data set"]
    # Not configured at all (a plain script, a notebook): shown for the call, then nothing is left behind.
    monkeypatch.setattr(logging.root, "handlers", [])
    before = _logger_state()
    call()
    assert capsys.readouterr() == (EXPECTED_OUT, EXPECTED_ERR)
    assert _logger_state() == before
    # absl's own handler (TensorFlow's checkpointing puts it on the root logger) is not a caller's
    # configuration: a second pretrain() in the same process shows its records too.
    from absl import logging as absl_logging

    monkeypatch.setattr(logging.root, "handlers", [absl_logging.get_absl_handler()])
    call()
    assert capsys.readouterr() == (EXPECTED_OUT, EXPECTED_ERR)
