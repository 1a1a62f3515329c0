"""Runs many invocations of one moco_tf command line in this one process (one TensorFlow start-up
instead of one per case) and reports, per case, the exit code, stderr and whether a traceback
escaped. Used by tests/test_bad_inputs.py:

    python tests/cli_driver.py train cases.json results.json

cases.json: [{"args": [...], "env": {...}, "lock": "DIR"?}, ...]; "lock" holds DIR's run lock from
another open file (as a second run would see it) during the case.
"""

import contextlib
import io
import json
import os
import sys
import traceback


def _entry(command: str):
    from absl import flags

    if command == "train":
        from moco_tf import train

        return train.run
    if command in ("export", "convert"):
        import importlib

        from moco_tf.export import run_cli

        module = importlib.import_module(f"moco_tf.{command}")
        module._define_flags()
        extra = (ImportError,) if command == "convert" else ()  # as `python -m moco_tf.convert` reports
        return lambda argv: run_cli(module._main, argv=argv, user_errors=extra)
    del flags
    raise SystemExit(f"unknown command {command}")


def main() -> None:
    from absl import flags

    from moco_tf import runlock

    command, cases_path, results_path = sys.argv[1:]
    cases = json.load(open(cases_path))
    entry = _entry(command)
    results = []
    for case in cases:
        saved_env = dict(os.environ)
        os.environ.update(case.get("env", {}))
        if flags.FLAGS.is_parsed():
            flags.FLAGS.unparse_flags()
        holder = runlock.RunLock(case["lock"]).acquire() if case.get("lock") else None
        err, out, code, escaped = io.StringIO(), io.StringIO(), None, None
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                entry([f"moco_tf.{command}", *case["args"]])
            code = 0
        except SystemExit as stop:
            code = 0 if stop.code is None else stop.code if isinstance(stop.code, int) else 1
        except BaseException:  # noqa: BLE001 - what the user would have seen as a traceback
            escaped = traceback.format_exc()
        finally:
            if holder:
                holder.release()
            os.environ.clear()
            os.environ.update(saved_env)
        results.append({"code": code, "stderr": err.getvalue(), "stdout": out.getvalue(), "traceback": escaped})
    json.dump(results, open(results_path, "w"))


if __name__ == "__main__":
    main()
