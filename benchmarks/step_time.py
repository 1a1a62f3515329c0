"""Seconds per MoCo train step (fit, steady state) for a given arch / image size / batch.

    python benchmarks/step_time.py --arch=resnet18 --image_size=32 --batch_size=256 --cifar_stem
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from moco_tf.model import MoCo  # noqa: E402
from moco_tf.optimizers import SGD  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--cifar_stem", action="store_true")
    parser.add_argument("--mlp", action="store_true")
    parser.add_argument("--bn_groups", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--jit_compile", action="store_true")
    args = parser.parse_args()

    model = MoCo(args.arch, queue_size=4096, momentum=0.99, temperature=0.1, mlp=args.mlp,
                 cifar_stem=args.cifar_stem, bn_groups=args.bn_groups, image_size=args.image_size)
    model.compile(optimizer=SGD(0.06, weight_decay=5e-4), jit_compile=args.jit_compile)
    views = tf.random.normal([args.batch_size, 2, args.image_size, args.image_size, 3])
    dataset = tf.data.Dataset.from_tensors(views).repeat()
    model.fit(dataset, steps_per_epoch=2, epochs=1, verbose=0)  # trace and warm up
    start = time.perf_counter()
    model.fit(dataset, steps_per_epoch=args.steps, epochs=1, verbose=0)
    seconds = (time.perf_counter() - start) / args.steps
    print(f"{args.arch} {args.image_size}x{args.image_size} batch {args.batch_size}: "
          f"{seconds:.2f} s/step, {args.batch_size / seconds:.1f} images/s")


if __name__ == "__main__":
    main()
