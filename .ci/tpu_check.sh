#!/usr/bin/env bash
# CI, after the main suite (.ci/run): the Cloud TPU install (requirements-tpu.txt and
# requirements-tpu-nodeps.txt, docs/tpu.md) in a second venv, checked to be TensorFlow's
# TPU build and no other TensorFlow, and the tests that matter most on a TPU run on it: the
# static-shape colour stage equals the host's, a bf16 step, and tests/test_project_tpu_build.py (the
# install itself; libtpu loads; a few quickstart steps with --steps_per_execution=2 and the colour
# stage in the step, export, hub.KerasLayer load). This machine has no TPU: the code runs on the
# TPU build's CPU device.
#
# libtpu stands in for Google's: requirements-tpu.txt pins libtpu 0.0.21 from PyPI (Google's
# index, which Google's TPU VM instructions use, is out of reach here). TPU_SKIP_MDS_QUERY=1 keeps
# libtpu from asking the GCE metadata server (30 tries) about a TPU this machine does not have.
#
# Budget: CI has ~2.5 minutes left after the main suite, and the TPU set is a 2.4 GB venv. So the
# venv is kept between CI runs, under a name made from the two requirement files' content (and
# the Python version): a change to either installs a new one; MOCO_TF_TPU_FRESH=1 forces a fresh
# install. The package checks below run every time. Measured on this project's 2-core machine,
# shared (load 5-6): a new venv from pip's cache, 93 s to install + 81 s of checks and tests
# (174 s); the venv kept, 75 s in all (tests 61 s: quickstart + export + hub 29 s, libtpu 13 s,
# bf16 11 s, colour stage 6 s).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
key="$( (python3 --version; cat requirements-tpu.txt requirements-tpu-nodeps.txt) | sha256sum | cut -c1-12)"
venv="${MOCO_TF_TPU_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/moco_tf/venv-tpu-$key}"
if [ ! -f "$venv/.installed" ] || [ "${MOCO_TF_TPU_FRESH:-0}" = 1 ]; then
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
  # (The grep drops pip's warnings about this machine's unused local index folders.)
  "$venv/bin/pip" install -q -r requirements-tpu.txt pytest 2>&1 | { grep -v "^WARNING: Location" || true; }
  "$venv/bin/pip" install -q --no-deps -r requirements-tpu-nodeps.txt 2>&1 | { grep -v "^WARNING: Location" || true; }
  touch "$venv/.installed"
  echo "tpu_check: installed $venv in $((SECONDS - start)) s"
else
  echo "tpu_check: reusing $venv"
fi

# The set: tensorflow-tpu, no plain tensorflow; `pip check` reports only tf-keras's declared
# tensorflow (installed --no-deps on purpose, see requirements-tpu.txt).
packages="$("$venv/bin/pip" list --format=freeze 2>/dev/null)"
grep -iE "^(tensorflow[-_]tpu|libtpu|keras|tf[-_]keras|tensorflow[-_]hub|tensorboard|protobuf|numpy)==" <<<"$packages"
grep -qiE "^tensorflow[-_]tpu==2\.20\." <<<"$packages" || { echo "tpu_check: tensorflow-tpu 2.20 is not installed"; exit 1; }
if grep -qiE "^tensorflow==" <<<"$packages"; then echo "tpu_check: the plain tensorflow is installed"; exit 1; fi
problems="$("$venv/bin/pip" check 2>&1 || true)"
if [ "$problems" != "tf-keras 2.20.1 requires tensorflow, which is not installed." ]; then
  echo "tpu_check: unexpected pip check: $problems"; exit 1
fi

# The code on the TPU build's CPU device, libtpu not loaded (TPU_LOAD_LIBRARY=0): loaded, it lists
# a TPU_SYSTEM device, Keras's jit_compile="auto" then picks XLA, and this build has no XLA for
# the host CPU (tests/test_project_tpu_build.py says more; its libtpu test loads libtpu in a subprocess).
# So the XLA step itself is checked on plain TensorFlow only (the main suite).
export TPU_LOAD_LIBRARY=0 TPU_SKIP_MDS_QUERY=1 TF_CPP_MIN_LOG_LEVEL=2
# -o addopts=: not the main suite's xdist options (the TPU venv has no pytest-xdist).
"$venv/bin/python" -m pytest -q -o addopts= -p no:cacheprovider --durations=0 \
  tests/test_project_tpu_build.py \
  "tests/test_data_augment_color_stage.py::test_pipeline_crops_then_step_colour_equals_host_views[arrays]" \
  "tests/test_training_mixed_precision.py::test_one_mixed_step_against_float32[bf16]"
echo "tpu_check: done in $((SECONDS - start)) s"
