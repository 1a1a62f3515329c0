"""The command lines keep TensorFlow's start-up notices off the screen (moco_tf/_quiet_tf_startup.py,
run by importing moco_tf.cli, which every command line imports first): INFO notices and, with no
GPU driver, the cuInit failure go; warnings, errors and a crash's last words stay; a
TF_CPP_MIN_LOG_LEVEL the user set is left alone. `import moco_tf` (the library) does none of it.
Fresh processes, clean env."""

import ast
import os
import re
import subprocess
import sys
import textwrap

import pytest

from moco_tf._quiet_tf_startup import nvidia_driver_present

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFO_LINE = re.compile(r"^I\d{4} ", re.M)
CUINIT = "failed call to cuInit"
ONEDNN = "oneDNN custom operations are on"
HEADER = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"

# A stand-in for TensorFlow that prints what the real one prints at import (copied from TF 2.21
# on a CPU machine), plus a real warning, then optionally dies the way a FATAL check does.
FAKE_TENSORFLOW = textwrap.dedent(
    f"""
    import os, sys
    def _err(text):
        os.write(2, text.encode())
    _err({HEADER!r} + "\\n")
    _err("I0000 00:00:1795985441.822417    3243 port.cc:153] {ONEDNN}. You may see ...\\n")
    _err("I0000 00:00:1795985441.823230    3243 cudart_stub.cc:31] Could not find cuda drivers\\n")
    _err("W0000 00:00:1795985441.9    3243 some_op.cc:1] a real warning\\n")
    print("a python line on stderr", file=sys.stderr)
    if os.environ.get("FAKE_TF_ABORT"):
        _err("F0000 00:00:1795985442.0    3243 cpu_feature_guard.cc:1] fatal: no AVX\\n")
        os.abort()
    class config:
        @staticmethod
        def list_physical_devices(kind=None):
            _err("E0000 00:00:1795985446.018963    3243 cuda_platform.cc:52] {CUINIT}: INTERNAL\\n")
            return []
    """
)


def _clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
    env["PYTHONPATH"] = ROOT
    env.update(extra)
    return env


def _python(code: str, env: dict, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def fake_tf_env(tmp_path):
    (tmp_path / "tensorflow").mkdir()
    (tmp_path / "tensorflow" / "__init__.py").write_text(FAKE_TENSORFLOW)
    return _clean_env(PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")


# What `python -m moco_tf.<command>` does first: import moco_tf.cli.
REPORT = (
    "import moco_tf.cli, tensorflow, os, sys; print('level', os.environ.get('TF_CPP_MIN_LOG_LEVEL'), file=sys.stderr)"
)
COMMAND_LINES = ("train", "knn", "lincls", "finetune", "export", "convert", "plot")


def test_filter_drops_notices_and_keeps_warnings(fake_tf_env):
    result = _python(REPORT, fake_tf_env)
    assert result.returncode == 0, result.stderr
    err = result.stderr
    assert HEADER not in err and ONEDNN not in err and "Could not find cuda drivers" not in err
    assert CUINIT not in err  # dropped with no driver; with one, nothing probes the fake
    assert "a real warning" in err and "a python line on stderr" in err
    assert "level 1" in err  # INFO off, warnings on; and what TF reads later too


def test_filter_forwards_a_crash_during_import(fake_tf_env):
    result = _python(REPORT, {**fake_tf_env, "FAKE_TF_ABORT": "1"})
    assert result.returncode != 0
    assert "fatal: no AVX" in result.stderr and "a real warning" in result.stderr
    assert ONEDNN not in result.stderr


def test_users_level_is_left_alone(fake_tf_env):
    result = _python(REPORT, {**fake_tf_env, "TF_CPP_MIN_LOG_LEVEL": "0"})
    assert result.returncode == 0, result.stderr
    assert "level 0" in result.stderr and ONEDNN in result.stderr and HEADER in result.stderr


def test_real_tensorflow_start_up_is_quiet_unless_the_user_asks():
    """The real TensorFlow: with level 0 (the user's choice) its INFO notices show, so the check
    that they are gone by default can fail; a real C++ warning still shows by default."""
    code = REPORT + textwrap.dedent(
        """
        import tensorflow as tf
        tf.config.list_physical_devices()
        ds = tf.data.Dataset.from_tensor_slices([1.0, 0.0]).map(lambda x: tf.debugging.check_numerics(1 / x, "inf"))
        print(list(ds.ignore_errors(log_warning=True).as_numpy_iterator()))
        """
    )
    loud = _python(code, _clean_env(TF_CPP_MIN_LOG_LEVEL="0"))
    assert loud.returncode == 0, loud.stderr
    assert "level 0" in loud.stderr and INFO_LINE.search(loud.stderr) and HEADER in loud.stderr

    quiet = _python(code, _clean_env())
    assert quiet.returncode == 0, quiet.stderr
    assert "level 1" in quiet.stderr
    assert not INFO_LINE.search(quiet.stderr) and HEADER not in quiet.stderr, quiet.stderr
    assert ONEDNN not in quiet.stderr and "cpu_feature_guard" not in quiet.stderr
    if not nvidia_driver_present():
        assert CUINIT in loud.stderr  # TF prints it here, so its absence below means something
        assert CUINIT not in quiet.stderr, quiet.stderr
    # tf.data's warning for a skipped element (moco_tf.data relies on it for unreadable files)
    assert re.search(r"^W\d{4} .*ignore_errors_dataset_op", quiet.stderr, re.M), quiet.stderr
    assert "[np.float32(1.0)]" in quiet.stdout


def test_importing_the_library_starts_nothing_and_changes_nothing(fake_tf_env):
    """`import moco_tf` (and its lazy names' modules' parent) leaves TensorFlow unimported, the
    environment as it was and stderr unfiltered: the caller's own `import tensorflow` prints what
    TensorFlow prints. No child process is started."""
    code = textwrap.dedent(
        """
        import os, subprocess, sys
        started = []
        real_init = subprocess.Popen.__init__
        def spy(self, *args, **kwargs):
            started.append(args)
            real_init(self, *args, **kwargs)
        subprocess.Popen.__init__ = spy
        import moco_tf
        print("after import:", "tensorflow" in sys.modules, os.environ.get("TF_CPP_MIN_LOG_LEVEL"), started,
              file=sys.stderr)
        import tensorflow
        """
    )
    result = _python(code, fake_tf_env)
    assert result.returncode == 0, result.stderr
    assert "after import: False None []" in result.stderr
    assert HEADER in result.stderr and ONEDNN in result.stderr  # the caller's import, untouched


def test_every_command_line_imports_moco_tf_cli_first():
    """`python -m moco_tf.X` imports moco_tf (now quiet-free), then moco_tf/X.py: its first import
    must be moco_tf.cli, before anything that imports TensorFlow (keras, the library)."""
    for name in COMMAND_LINES:
        tree = ast.parse(open(os.path.join(ROOT, "moco_tf", f"{name}.py")).read())
        imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        imports = [node for node in imports if not (isinstance(node, ast.ImportFrom) and node.module == "__future__")]
        first = imports[0]
        assert isinstance(first, ast.ImportFrom) and first.module == "moco_tf", name
        assert [alias.name for alias in first.names] == ["cli"], name


def test_a_real_command_line_starts_quietly():
    """`python -m moco_tf.train` with the real TensorFlow: no INFO notice, no absl header, and
    (with no driver) no cuInit failure before its help."""
    result = subprocess.run([sys.executable, "-m", "moco_tf.train", "--helpshort"], cwd=ROOT, env=_clean_env(),
                            capture_output=True, text=True, timeout=300)
    assert "--model_dir" in result.stdout, result.stderr  # absl ends a help with status 1
    assert not INFO_LINE.search(result.stderr) and HEADER not in result.stderr, result.stderr
    if not nvidia_driver_present():
        assert CUINIT not in result.stderr, result.stderr
