"""Start-up cost of `--dataset=folder`: files opened and time to the first step, by folder size.

    python benchmarks/startup_time.py --sizes=10000,100000

For each size N it writes N small JPEGs (10 class folders, 32x32, ~0.8 KB each) under --root
(default /tmp/moco_tf_startup; deleted afterwards unless --keep), then runs a one-step training
run (`moco_tf.train --max_steps=1`, a width-8 resnet18 at 32 px, no kNN) in child processes:
- once under `strace -f -e trace=openat` to count the distinct files of the folder opened;
- --repeats times plain, timing the whole process (start to exit), and `make_source` alone in a
  fresh process (TensorFlow's import not counted): the data's part of the start-up.
Both a fresh run's page cache (the folder was just written) and a shared machine's load favour
or hurt all sizes alike; the per-size difference is what start-up costs per file.
"""

import argparse
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = 10
RUN_FLAGS = [
    "--flagfile=configs/quickstart.flags", "--dataset=folder", "--batch_size=32", "--queue_size=64",
    "--bn_groups=2", "--width=8", "--max_steps=1", "--knn_every=0", "--export_dir=", "--seed=0",
]


def make_folder(root: str, n: int) -> str:
    """N copies of distinct small JPEGs in CLASSES class folders (written once, reused)."""
    import numpy as np
    from PIL import Image

    folder = os.path.join(root, f"n{n}")
    if os.path.isdir(folder) and sum(len(f) for _, _, f in os.walk(folder)) == n:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(0)
    jpegs = []
    for _ in range(64):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(buf, "JPEG", quality=75)
        jpegs.append(buf.getvalue())
    for c in range(CLASSES):
        os.makedirs(os.path.join(folder, f"class{c}"))
    for i in range(n):
        with open(os.path.join(folder, f"class{i % CLASSES}", f"{i:07d}.jpg"), "wb") as f:
            f.write(jpegs[i % len(jpegs)])
    return folder


def one_step_run(folder: str, model_dir: str, strace_out: str | None = None) -> tuple[float, str]:
    """Wall seconds of a one-step training run on `folder`, and its output."""
    shutil.rmtree(model_dir, ignore_errors=True)
    command = [sys.executable, "-m", "moco_tf.train", *RUN_FLAGS, f"--data_dir={folder}", f"--model_dir={model_dir}"]
    if strace_out:
        command = ["strace", "-f", "-qq", "-e", "trace=openat", "-o", strace_out, *command]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ROOT}
    began = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"one-step run failed ({done.returncode}): {done.stderr[-2000:]}")
    return wall, done.stdout + done.stderr


def files_opened(strace_out: str, folder: str) -> int:
    """Distinct files under `folder` that an openat call named (directories excluded)."""
    pattern = re.compile(r'openat\([^,]*, "' + re.escape(folder) + r'/([^"]+\.jpg)"')
    with open(strace_out) as f:
        return len({m.group(1) for line in f for m in [pattern.search(line)] if m})


def source_seconds(folder: str) -> float:
    """Seconds `make_source("folder", ...)` takes, in a fresh process (TF import not counted)."""
    code = (
        "import sys, time; from moco_tf.data import sources; t = time.perf_counter(); "
        "s = sources.make_source('folder', sys.argv[1]); print(time.perf_counter() - t, s.num_examples('train'))"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", code, folder], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    return float(out[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--root", default="/tmp/moco_tf_startup")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per size; the best counts")
    parser.add_argument("--keep", action="store_true", help="keep the folders (for a before/after pair)")
    parser.add_argument("--no_strace", action="store_true")
    args = parser.parse_args()
    os.makedirs(args.root, exist_ok=True)
    model_dir = tempfile.mkdtemp(prefix="moco_tf_startup_run_")
    print("| files | opened (of the folder) | make_source s | one-step run s (wall, best of "
          f"{args.repeats}) |\n|---|---|---|---|")
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            folder = make_folder(args.root, n)
            opened = "-"
            if not args.no_strace and shutil.which("strace"):
                trace = os.path.join(model_dir, "strace.txt")
                one_step_run(folder, os.path.join(model_dir, "run"), trace)
                count = files_opened(trace, folder)
                opened = f"{count} ({100 * count / n:.2f}%)"
            listing = min(source_seconds(folder) for _ in range(args.repeats))
            wall = min(one_step_run(folder, os.path.join(model_dir, "run"))[0] for _ in range(args.repeats))
            print(f"| {n} | {opened} | {listing:.2f} | {wall:.1f} |", flush=True)
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(args.root, ignore_errors=True)


if __name__ == "__main__":
    main()
