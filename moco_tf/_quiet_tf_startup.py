"""Keep TensorFlow's start-up notices off a new user's first screen, without hiding real problems.

On a CPU-only machine `import tensorflow` and its first device probe print, before any work:

    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 ... port.cc:153] oneDNN custom operations are on. You may see slightly different ...
    I0000 ... cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
    E0000 ... cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: ... (303)

TF_CPP_MIN_LOG_LEVEL alone cannot remove them (TF 2.21): the INFO lines are
written before TensorFlow reads the variable, so they show even at level 3, and the cuInit line
is an ERROR, so only level 3 (which also hides every real C++ error) drops it. What this module
does instead, only when the user has not set TF_CPP_MIN_LOG_LEVEL and TensorFlow is not yet
imported:

- sets TF_CPP_MIN_LOG_LEVEL=1: INFO off, C++ warnings and errors on (tf.data's "skipping
  unreadable file" warning, for one, is a C++ warning a user must see);
- imports TensorFlow with file descriptor 2 passed through a line filter that drops the INFO
  lines TensorFlow printed in spite of that level (and absl's header line above them);
- on a machine with no NVIDIA driver (no /proc/driver/nvidia, no libcuda), probes the devices in
  the same window and drops the cuInit failure: with no driver it is certain and means nothing.
  Where a driver exists, a cuInit failure is a real problem and stays visible.

The filter is a child process reading a pipe, so it cannot dead-lock on a full pipe buffer and
still forwards what TensorFlow printed if the import kills the process (e.g. the FATAL line
about missing AVX instructions). A user who sets TF_CPP_MIN_LOG_LEVEL (any value, 0 shows
everything) gets TensorFlow's own behaviour, untouched.

Only the command lines run it (`moco_tf.cli` at import): it sets an environment variable and
redirects file descriptor 2 for a while, which a library imported into someone's program must not.
"""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys

LEVEL_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"
DEFAULT_LEVEL = "1"  # INFO off; WARNING, ERROR and FATAL on

# What the filter drops. absl/glog prefix: severity letter, MMDD, time, thread id, file:line]
_ABSL_HEADER = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_GLOG_INFO = r"I\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] "
_CUINIT = r"E\d{4} \d\d:\d\d:\d+\.\d+ +\d+ cuda_platform\.cc:\d+\] failed call to cuInit"

# The filter, run as a child process: copies stdin to stdout line by line, leaving out absl's
# header, INFO lines, and (with no driver) the cuInit failure. Self-contained (only `re`), so it
# starts in milliseconds and imports nothing of ours. argv[1]: "1" if a driver is present.
FILTER_PROGRAM = f"""
import re, sys
info, cuinit = re.compile({_GLOG_INFO!r}), re.compile({_CUINIT!r})
driver = sys.argv[1] == "1"
out = sys.stdout.buffer
for raw in sys.stdin.buffer:
    line = raw.decode("utf-8", "replace").rstrip("\\r\\n")
    if line == {_ABSL_HEADER!r} or info.match(line) or (not driver and cuinit.match(line)):
        continue
    out.write(raw)
    out.flush()
"""


def nvidia_driver_present() -> bool:
    """True when an NVIDIA driver could answer cuInit: /proc/driver/nvidia or a libcuda to load."""
    # /proc/driver/nvidia: Linux hosts and GPU containers; find_library: WSL2 and odd installs.
    return os.path.exists("/proc/driver/nvidia") or ctypes.util.find_library("cuda") is not None


def import_tensorflow_quietly() -> None:
    """Import TensorFlow (and probe its devices where no driver exists) behind the line filter.

    Does nothing when the user set TF_CPP_MIN_LOG_LEVEL or TensorFlow is already imported (too
    late to change anything); imports without the filter where a pipe or child cannot be made.
    """
    if LEVEL_VARIABLE in os.environ or "tensorflow" in sys.modules:
        return
    # Stays set, as if the user had set it: libraries TensorFlow loads later read it too.
    os.environ[LEVEL_VARIABLE] = DEFAULT_LEVEL
    driver = nvidia_driver_present()
    try:
        sys.stderr.flush()
        read_end, write_end = os.pipe()
    except (OSError, ValueError):
        return
    try:
        child = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", FILTER_PROGRAM, "1" if driver else "0"],
            stdin=read_end, stdout=2, close_fds=True,
        )
        saved = os.dup(2)
    except (OSError, ValueError):
        os.close(write_end)
        return  # no filter here (no fd 2, no executable): TensorFlow prints as it would
    finally:
        os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        import tensorflow as tf

        if not driver:  # the cuInit failure happens here, inside the window, where it is dropped
            tf.config.list_physical_devices("GPU")
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the child sees EOF and exits
        os.close(saved)
        child.wait()
