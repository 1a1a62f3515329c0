"""Runs many invocations of one moco_tf command line in this one process (one TensorFlow start-up
instead of one per case) and reports, per case, the exit code, stderr and whether a traceback
escaped. Used by tests/test_cli_train_bad_inputs.py:

    python tests/support/cli_driver.py train cases.json results.json
    python tests/support/cli_driver.py all cases.json results.json   # {command: cases}, every command in turn

cases.json: [{"args": [...], "env": {...}, "lock": "DIR"?}, ...]; "lock" holds DIR's run lock from
another open file (as a second run would see it) during the case. A case {"numeric": {"args": [...],
"float": [values], "int": [values]}} stands for one case per numeric flag of the command (walked
from its flag definitions) and value: args + ["--FLAG=VALUE"]; its results carry "flag" and "value".
"""

import contextlib
import importlib
import io
import json
import os
import sys
import traceback

COMMANDS = ("train", "knn", "lincls", "finetune", "export", "convert", "plot")


def _entry(command: str):
    """The command line's `run(argv)`: flags defined once, user mistakes reported as by `python -m`."""
    if command not in COMMANDS:
        raise SystemExit(f"unknown command {command}")
    return importlib.import_module(f"moco_tf.{command}").run


def numeric_flags(command: str) -> dict[str, str]:
    """name -> "int" or "float" for every integer and float flag of the command line."""
    from absl import flags

    from moco_tf.cli import flags as cli_flags

    getattr(cli_flags, f"define_{command}_flags")()
    found = {}
    for flag in flags.FLAGS.get_flags_for_module(cli_flags.__name__):
        if isinstance(flag.parser, flags.IntegerParser):
            found[flag.name] = "int"
        elif isinstance(flag.parser, flags.FloatParser):
            found[flag.name] = "float"
    return found


def _expand(command: str, cases: list[dict]) -> list[dict]:
    out = []
    for case in cases:
        if "numeric" not in case:
            out.append(case)
            continue
        template = case["numeric"]
        for name, kind in sorted(numeric_flags(command).items()):
            for value in template[kind]:
                out.append({"args": [*template["args"], f"--{name}={value}"], "flag": name, "value": value})
    return out


def _forget_flags() -> None:
    """Deletes every moco_tf flag, so the next command line defines its own (several command lines
    in one process: one TensorFlow start-up for all of them)."""
    from absl import flags

    from moco_tf.cli import flags as cli_flags

    if flags.FLAGS.is_parsed():
        flags.FLAGS.unparse_flags()
    for flag in list(flags.FLAGS.get_flags_for_module(cli_flags.__name__)):
        delattr(flags.FLAGS, flag.name)


def main() -> None:
    command, cases_path, results_path = sys.argv[1:]
    if command == "all":  # cases.json: {command: [cases]}; results.json: {command: [results]}
        results = {}
        for name, cases in json.load(open(cases_path)).items():
            _forget_flags()
            results[name] = run_cases(name, cases)
    else:
        results = run_cases(command, json.load(open(cases_path)))
    json.dump(results, open(results_path, "w"))


def run_cases(command: str, cases: list[dict]) -> list[dict]:
    from absl import flags

    from moco_tf.training import runlock

    cases = _expand(command, cases)
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
        results.append({"code": code, "stderr": err.getvalue(), "stdout": out.getvalue(), "traceback": escaped,
                        "args": case["args"], "flag": case.get("flag"), "value": case.get("value")})
    return results


if __name__ == "__main__":
    main()
