"""Seconds per MoCo train step (fit, steady state), optionally against the PyTorch reference step.

    python benchmarks/step_time.py --arch=resnet18 --image_size=32 --batch_size=256 --cifar_stem
    python benchmarks/step_time.py --cifar_stem --width=16 --torch --threads=1 --rounds=3

With --torch the official step (tests/support/torch_reference.py: builder.py with the CIFAR demo's
SplitBatchNorm and single-GPU key shuffle, SGD momentum 0.9) runs the same model from the same
weights on the same batch; the two alternate round by round (a shared machine's load hits both)
and the best round of each counts. The torch side uses CUDA when torch sees a GPU.

--color_in_step feeds uint8 crop pairs and runs the v2 colour stage inside the step, as
--color_stage=device does (the step's cost of moving the colour stage off the host).
--mixed_precision bf16 / fp16 computes in that dtype (fp16 with Keras's loss scaling).
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from moco_tf.models.moco import MoCo  # noqa: E402
from moco_tf.training.config import PRECISION_POLICIES  # noqa: E402
from moco_tf.training.optimizers import SGD  # noqa: E402

LR, WD = 0.06, 5e-4




def batch_data(shape: tuple[int, ...], color_in_step: bool) -> np.ndarray:
    """A fixed batch of view pairs: uint8 crops for the colour stage in the step, else float32 views."""
    if color_in_step:
        return np.random.RandomState(0).randint(0, 256, shape).astype("uint8")
    return np.random.RandomState(0).randn(*shape).astype("float32")


def time_moco_tf(model: MoCo, views: np.ndarray, steps: int) -> float:
    if views.dtype == np.uint8:  # crop pairs: the colour stage in the step, a new draw each step
        crops = tf.constant(views)
        dataset = tf.data.Dataset.range(1 << 30).map(
            lambda i: {"views": crops, "color_seed": tf.stack([i, tf.constant(7, tf.int64)])}
        )
    else:
        dataset = tf.data.Dataset.from_tensors(tf.constant(views)).repeat()
    dataset = dataset.prefetch(2)
    start = time.perf_counter()
    model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False)
    return (time.perf_counter() - start) / steps


def time_torch(trainer, views: np.ndarray, steps: int) -> float:
    import torch

    start = time.perf_counter()
    for _ in range(steps):
        loss = trainer.step(views)
    float(loss)  # waits for the device
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model and batch flags shared with step_breakdown.py."""
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--cifar_stem", action="store_true")
    parser.add_argument("--width", type=int, default=64, help="ResNet base channels (64 standard)")
    parser.add_argument("--mlp", action="store_true")
    parser.add_argument("--bn_groups", type=int, default=8)
    parser.add_argument("--queue_size", type=int, default=4096)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=1, help="timed rounds per framework; the best counts")
    parser.add_argument("--jit_compile", action="store_true")
    parser.add_argument("--torch", action="store_true", help="also time the PyTorch reference step")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for each framework (0: all cores)")
    parser.add_argument("--color_in_step", action="store_true", help="uint8 crops in, v2 colour stage in the step")
    parser.add_argument("--mixed_precision", choices=sorted(PRECISION_POLICIES), default="none")
    args = parser.parse_args()
    keras.mixed_precision.set_global_policy(PRECISION_POLICIES[args.mixed_precision])
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)

    model = MoCo(args.arch, queue_size=args.queue_size, moco_momentum=0.99, temperature=0.1, mlp=args.mlp,
                 width=args.width, cifar_stem=args.cifar_stem, bn_groups=args.bn_groups, image_size=args.image_size,
                 aug="v2", color_in_step=args.color_in_step)  # fmt: skip
    model.compile(optimizer=SGD(LR, momentum=0.9, weight_decay=WD), jit_compile=args.jit_compile)
    shape = (args.batch_size, 2, args.image_size, args.image_size, 3)
    views = batch_data(shape, color_in_step=False)  # the torch step's input
    data = batch_data(shape, color_in_step=True) if args.color_in_step else views  # moco_tf's
    trainer = None
    if args.torch:
        import torch

        from tests.support import torch_reference as ref

        if args.threads:
            torch.set_num_threads(args.threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        trainer = ref.DemoTrainer(model, LR, WD, device=device)  # before moco_tf's first step: same start
        time_torch(trainer, views, 2)  # warm up
    time_moco_tf(model, data, 2)  # trace and warm up
    best = {"moco_tf": float("inf"), "torch": float("inf")}
    for _ in range(args.rounds):
        best["moco_tf"] = min(best["moco_tf"], time_moco_tf(model, data, args.steps))
        if trainer is not None:
            best["torch"] = min(best["torch"], time_torch(trainer, views, args.steps))
    name = f"{args.arch}{'' if args.width == 64 else f' width {args.width}'} {args.image_size}x{args.image_size}"
    name += " colour in step" if args.color_in_step else ""
    name += f" {args.mixed_precision}" if args.mixed_precision != "none" else ""
    name += " XLA" if args.jit_compile else ""
    for framework, seconds in best.items():
        if seconds < float("inf"):
            print(f"{framework:8s} {name} batch {args.batch_size}: {seconds:.3f} s/step, "
                  f"{args.batch_size / seconds:.1f} images/s")  # fmt: skip
    if trainer is not None:
        print(f"moco_tf / torch step time: {best['moco_tf'] / best['torch']:.2f}")


if __name__ == "__main__":
    main()
