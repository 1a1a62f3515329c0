"""TensorFlow's TPU build (requirements-tpu.txt) as installed by .ci/tpu_check.sh: it is the only
TensorFlow distribution, and moco_tf trains, exports and loads through hub.KerasLayer on it.

Skipped where `tensorflow` is the plain distribution (the main venv): there the rest of the suite
covers the same code. .ci/tpu_check.sh runs this file on the TPU venv, with TPU_LOAD_LIBRARY=0 (the
TPU build without libtpu: a CPU build, see below), next to the other tests that matter on a TPU.

Seen on tensorflow-tpu 2.20.0 here: it has no XLA backend for the host CPU (XLA compiles for the
TPU, through libtpu), so `jit_compile=True` fails on a CPU ("could not find registered transfer
manager for platform Host"), with or without libtpu. The XLA step is checked on plain TensorFlow
(tests/test_models_moco.py::test_xla_step_equals_plain_step); here the test below pins the fact.
With libtpu loaded, the TPU build lists a TPU_SYSTEM device even on a machine without a TPU, and
Keras's jit_compile="auto" then picks XLA, which fails on the CPU: hence TPU_LOAD_LIBRARY=0.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pytest

from tests.support.helpers import ENV, ROOT


def _installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _installed("tensorflow-tpu"), reason="not the TPU build (requirements-tpu.txt)")


def test_tensorflow_is_the_tpu_build_and_the_only_one():
    import tensorflow as tf

    assert not _installed("tensorflow"), "the plain tensorflow distribution is installed next to tensorflow-tpu"
    owner = importlib.metadata.distribution("tensorflow-tpu")
    assert owner.version.startswith("2.20.")
    files = {str(f) for f in owner.files}
    assert "tensorflow/__init__.py" in files  # the package imported is the one this distribution installed
    assert tf.__version__ == owner.version
    assert os.path.realpath(tf.__file__) == os.path.realpath(owner.locate_file("tensorflow/__init__.py"))
    assert importlib.metadata.version("tf-keras").startswith("2.20.")


def test_libtpu_loads_into_the_tpu_build():
    """libtpu (0.0.21, the stand-in of requirements-tpu.txt) loads: TF lists its TPU_SYSTEM device.
    (0.0.52, what `libtpu~=0.0.14` resolves to on PyPI, aborts `import tensorflow`.)"""
    env = {k: v for k, v in ENV.items() if k != "TPU_LOAD_LIBRARY"}
    env["TPU_SKIP_MDS_QUERY"] = "1"  # no GCE metadata server here to ask for the TPU's topology
    script = "import tensorflow as tf; print([d.device_type for d in tf.config.list_logical_devices()])"
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "'TPU_SYSTEM'" in result.stdout, result.stdout


def test_xla_for_the_host_cpu_is_not_in_the_tpu_build():
    import tensorflow as tf

    compiled = tf.function(lambda x: 2 * x, jit_compile=True)
    with pytest.raises(tf.errors.NotFoundError, match="platform Host"):
        compiled(tf.ones([2]))


def test_quickstart_steps_export_and_hub_keras_layer(tmp_path):
    model_dir, export_dir = str(tmp_path / "run"), str(tmp_path / "export")
    train = [
        sys.executable, "-m", "moco_tf.train", "--flagfile=configs/quickstart.flags", "--width=8",
        "--max_steps=4", "--steps_per_execution=2", "--color_stage=device", "--knn_every=0", "--log_every=2",
        "--checkpoint_every=2",
        f"--model_dir={model_dir}", f"--export_dir={export_dir}",
    ]  # fmt: skip
    result = subprocess.run(train, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line.split(" | ")[0] for line in result.stdout.splitlines() if line.startswith("step ")] == [
        "step 2/4", "step 4/4"
    ], result.stdout
    # hub.KerasLayer is a Keras 2 (tf_keras) layer: the export loads into a tf_keras model.
    import numpy as np
    import tensorflow_hub as hub
    import tf_keras

    model = tf_keras.Sequential([tf_keras.Input((32, 32, 3)), hub.KerasLayer(export_dir, trainable=False)])
    out = model.predict(np.random.RandomState(0).rand(2, 32, 32, 3).astype(np.float32), verbose=0)
    assert out.shape == (2, 64) and np.all(np.isfinite(out)), out.shape
