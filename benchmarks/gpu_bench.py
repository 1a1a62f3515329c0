"""MoCo v2 ResNet-50 224 on one GPU: images/s and peak GPU memory per precision, with and without XLA.

    python benchmarks/gpu_bench.py [--budget_s 300] [--steps 10]

One process: finds the largest float32 batch that fits (halving from --max_batch), then at that
batch times the step (fit, steady state) in float32, mixed bfloat16 and mixed float16 (Keras's
loss scaling), each with and without XLA, and once with the colour stage in the step
(--color_stage=device; bf16 + XLA). Exits 2 at once, with one line, where TensorFlow sees no GPU.
Stops starting new measurements once --budget_s is spent and says which were skipped.
benchmarks/gpu.sh runs it with the PyTorch reference and the host pipeline.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from step_time import LR, WD, batch_data, time_moco_tf  # noqa: E402

from moco_tf.models.moco import MoCo  # noqa: E402
from moco_tf.training.config import PRECISION_POLICIES  # noqa: E402
from moco_tf.training.optimizers import SGD  # noqa: E402

SIZE = 224


def build(policy: str, jit: bool, color_in_step: bool) -> MoCo:
    keras.mixed_precision.set_global_policy(PRECISION_POLICIES[policy])
    # The official v2 recipe on one GPU: queue 65536, T 0.2, m 0.999, MLP head, no BN groups.
    model = MoCo("resnet50", queue_size=65536, moco_momentum=0.999, temperature=0.2, mlp=True, image_size=SIZE,
                 aug="v2", color_in_step=color_in_step)  # fmt: skip
    model.compile(optimizer=SGD(LR, momentum=0.9, weight_decay=WD), jit_compile=jit)
    return model


def measure(policy: str, jit: bool, batch: int, steps: int, color_in_step: bool = False) -> dict:
    tf.config.experimental.reset_memory_stats("GPU:0")
    model = build(policy, jit, color_in_step)
    data = batch_data((batch, 2, SIZE, SIZE, 3), color_in_step)
    start = time.perf_counter()
    time_moco_tf(model, data, 2)  # trace (and compile) + warm up
    warm = time.perf_counter() - start
    seconds = time_moco_tf(model, data, steps)
    peak = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**30
    del model
    keras.backend.clear_session()
    return {"images_per_s": batch / seconds, "s_per_step": seconds, "peak_gib": peak, "warmup_s": warm}


def largest_batch(max_batch: int, steps: int) -> tuple[int, dict]:
    """The largest batch (halving from max_batch) whose float32 step runs, and that run's timing."""
    batch = max_batch
    while batch >= 8:
        try:
            return batch, measure("none", False, batch, steps)
        except tf.errors.ResourceExhaustedError:
            print(f"float32 batch {batch}: out of GPU memory, halving", flush=True)
            keras.backend.clear_session()
            batch //= 2
    raise SystemExit("gpu_bench: not even batch 8 fits in float32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max_batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--budget_s", type=float, default=300.0)
    args = parser.parse_args()
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        print("gpu_bench: TensorFlow sees no GPU (needs tensorflow[and-cuda] and an NVIDIA driver)", file=sys.stderr)
        raise SystemExit(2)
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)  # leave room for the PyTorch side after us
    details = tf.config.experimental.get_device_details(gpus[0])
    print(f"GPU: {details.get('device_name', gpus[0].name)}, TF {tf.__version__}, Keras {keras.__version__}")
    start = time.perf_counter()
    batch, float32_run = largest_batch(args.max_batch, args.steps)
    print(f"largest float32 batch tried that fits: {batch} (from {args.max_batch}, halving)", flush=True)
    runs = [(p, jit, False) for p in ("none", "bf16", "fp16") for jit in (False, True)] + [("bf16", True, True)]
    for policy, jit, color in runs:
        name = f"{'float32' if policy == 'none' else 'mixed ' + policy:13s} {'XLA' if jit else 'no XLA':6s}"
        name += " colour in step" if color else ""
        if time.perf_counter() - start > args.budget_s:
            print(f"{name}: skipped, --budget_s {args.budget_s:.0f} spent", flush=True)
            continue
        try:
            first = (policy, jit, color) == ("none", False, False)  # timed by the batch search
            r = float32_run if first else measure(policy, jit, batch, args.steps, color)
        except tf.errors.ResourceExhaustedError:
            print(f"{name}: out of GPU memory at batch {batch}", flush=True)
            keras.backend.clear_session()
            continue
        print(f"{name} batch {batch}: {r['images_per_s']:8.1f} images/s ({r['s_per_step']:.3f} s/step), "
              f"peak GPU memory {r['peak_gib']:.1f} GiB, trace+compile+2 steps {r['warmup_s']:.0f} s", flush=True)
    print(f"BATCH={batch}")


if __name__ == "__main__":
    main()
