"""MoCo v2 view pairs per second: moco_tf's tf.data pipeline vs the official torchvision + PIL one.

Both read the same JPEG files from disk and end with two normalised float tensors per image;
both get the same number of CPU workers, and they run one after the other in one invocation.
A third side, "moco_tf_crops", is the host's share under --color_stage=device: decode, crop and
flip to uint8 pairs, the colour stage left to the accelerator's train step.

- 224x224: the CIFAR-10 test images, upscaled (bicubic, PIL) to a random shorter side in
  [256, 500] px and a random aspect ratio in [3/4, 4/3], saved as quality-90 JPEGs in a temp
  folder: ImageNet-like sizes. They are smoother than photos, so both sides decode them faster
  than real ImageNet files.
- 32x32: the CIFAR-10 train JPEGs as they are.
Without the CIFAR-10 archive (a GPU machine), the 224 images are smooth random colour fields of
the same sizes instead, and --num_small=0 skips the 32x32 run.

torchvision is not a dependency of moco_tf: its half runs in another interpreter, e.g.
    python3 -m venv /work/bench-venv
    /work/bench-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 pillow
    python benchmarks/augment_throughput.py --torch_python /work/bench-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# The real CIFAR-10 JPEGs: the folder named by MOCO_TF_DATASETS (as for the tests), default ../shared/datasets.
CIFAR10_TAR = os.path.join(
    os.environ.get("MOCO_TF_DATASETS", os.path.join(ROOT, "..", "shared", "datasets")), "cifar10-jpg.tar.gz"
)


# ----------------------------------------------------------------------------------------------
# data


def prepare(workdir: str, num_large: int, num_small: int) -> tuple[str, str]:
    """Extract CIFAR-10 JPEGs; make the upscaled 224-benchmark copies. Returns the two folders."""
    import numpy as np
    from PIL import Image

    small_dir, large_dir = os.path.join(workdir, "cifar"), os.path.join(workdir, "large")
    per_class_large, per_class_small = num_large // 10, num_small // 10
    rng = np.random.default_rng(0)
    if not os.path.exists(CIFAR10_TAR):
        if num_small:
            raise SystemExit(f"{CIFAR10_TAR} is missing: the 32x32 run needs it (or pass --num_small=0)")
        print(f"{CIFAR10_TAR} is missing: the 224 run uses synthetic colour fields")
        for i in range(num_large):
            os.makedirs(os.path.join(large_dir, f"c{i % 10}"), exist_ok=True)
            short = int(rng.integers(256, 501))
            w, h = short, int(short * np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
            y, x = np.mgrid[0:h, 0:w]
            field = rng.uniform(0, 255, (1, 1, 3)) + rng.uniform(-0.3, 0.3, (1, 1, 3)) * (x + y)[..., None]
            field += 20 * np.sin(x / rng.uniform(5, 40))[..., None]
            image = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
            image.save(os.path.join(large_dir, f"c{i % 10}", f"{i}.jpg"), quality=90)
        return large_dir, ""
    with tarfile.open(CIFAR10_TAR) as tar:
        members = []
        for m in tar:
            if not m.isfile():
                continue
            split, _, name = m.name.split("/")
            index = int(name[:-4])
            if (split == "test" and index < per_class_large) or (split == "train" and index < per_class_small):
                members.append(m)
        tar.extractall(small_dir, members=members, filter="data")
    test_dir = os.path.join(small_dir, "test")
    for cls in sorted(os.listdir(test_dir)):
        os.makedirs(os.path.join(large_dir, cls))
        for name in sorted(os.listdir(os.path.join(test_dir, cls))):
            short = int(rng.integers(256, 501))
            ratio = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
            size = (round(short * ratio), short) if ratio > 1 else (short, round(short / ratio))
            image = Image.open(os.path.join(test_dir, cls, name)).convert("RGB").resize(size, Image.BICUBIC)
            image.save(os.path.join(large_dir, cls, name), quality=90)
    return large_dir, os.path.join(small_dir, "train")


# ----------------------------------------------------------------------------------------------
# moco_tf


def run_moco_tf(folder: str, image_size: int, batch: int, workers: int, seconds: float, crops_only=False) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, ROOT)
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(workers)
    tf.config.threading.set_inter_op_parallelism_threads(workers)
    from moco_tf.data import pipelines, sources

    source = sources.make_source("folder", folder)
    ds = pipelines.pretrain_dataset(source, "train", image_size, "v2", batch, seed=0, color_in_step=crops_only)
    options = tf.data.Options()
    options.threading.private_threadpool_size = workers
    ds = ds.with_options(options)
    shape = (batch, 2, image_size, image_size, 3)
    return _time_batches(iter(ds), batch, seconds, lambda x: x["views"].shape == shape)


# ----------------------------------------------------------------------------------------------
# torchvision (runs in the interpreter given by --torch_python)


def run_torchvision(folder: str, image_size: int, batch: int, workers: int, seconds: float) -> dict:
    import random

    import torch
    import torchvision.datasets as datasets
    import torchvision.transforms as transforms
    from PIL import ImageFilter

    # main_moco.py of facebookresearch/moco, verbatim in substance.
    class GaussianBlur:
        def __init__(self, sigma=(0.1, 2.0)):
            self.sigma = sigma

        def __call__(self, x):
            return x.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.sigma[0], self.sigma[1])))

    class TwoCropsTransform:
        def __init__(self, base):
            self.base = base

        def __call__(self, x):
            return [self.base(x), self.base(x)]

    normalize = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    augmentation = transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size, scale=(0.2, 1.0)),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
            transforms.RandomApply([GaussianBlur([0.1, 2.0])], p=0.5),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )
    dataset = datasets.ImageFolder(folder, TwoCropsTransform(augmentation))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True, persistent_workers=True
    )

    def forever():
        while True:
            yield from loader

    return _time_batches(forever(), batch, seconds, lambda x: x[0][0].shape == (batch, 3, image_size, image_size))


# ----------------------------------------------------------------------------------------------


def _time_batches(batches, batch: int, seconds: float, check) -> dict:
    first = next(batches)
    assert check(first), "unexpected batch shape"
    for _ in range(3):  # warm-up: workers started, tf.data autotuned a little
        next(batches)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(batches)
        n += 1
    elapsed = time.perf_counter() - start
    return {"pairs_per_s": n * batch / elapsed, "batches": n, "seconds": elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--torch_python", help="interpreter with torch + torchvision (else moco_tf only)")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--seconds", type=float, default=30.0, help="timed seconds per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs per side; the best counts")
    parser.add_argument("--num_large", type=int, default=1000, help="upscaled JPEGs for the 224 run")
    parser.add_argument("--num_small", type=int, default=10000, help="CIFAR train JPEGs for the 32 run")
    parser.add_argument("--_worker", choices=["moco_tf", "moco_tf_crops", "torchvision"], help=argparse.SUPPRESS)
    parser.add_argument("--_folder", help=argparse.SUPPRESS)
    parser.add_argument("--_size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--_batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._worker:  # one measurement in a fresh process, printed as JSON
        measure = (args._folder, args._size, args._batch, args.workers, args.seconds)
        if args._worker == "torchvision":
            print(json.dumps(run_torchvision(*measure)))
        else:
            print(json.dumps(run_moco_tf(*measure, crops_only=args._worker == "moco_tf_crops")))
        return

    with tempfile.TemporaryDirectory() as workdir:
        t = time.perf_counter()
        large, small = prepare(workdir, args.num_large, args.num_small)
        took = time.perf_counter() - t
        print(f"prepared {args.num_large} upscaled + {args.num_small} CIFAR JPEGs in {took:.0f} s")
        print(f"load average before: {os.getloadavg()[0]:.2f} (the CPU may be shared)")
        print("moco_tf: the whole pipeline (--color_stage=host); moco_tf_crops: the host's share under "
              "--color_stage=device (decode, crop, flip; colour in the train step)")
        for size, folder, batch in ((224, large, 32), (32, small, 256)):
            if not folder or not args.num_small and size == 32:
                continue
            sides = [("moco_tf", sys.executable), ("moco_tf_crops", sys.executable)]
            if args.torch_python:
                sides.append(("torchvision", args.torch_python))
            rates = {name: [] for name, _ in sides}
            # Alternate the sides so that a change in the machine's load hits both alike.
            for _ in range(args.rounds):
                for name, python in sides:
                    cmd = [python, __file__, f"--_worker={name}", f"--_folder={folder}", f"--_size={size}"]
                    cmd += [f"--_batch={batch}", f"--workers={args.workers}", f"--seconds={args.seconds}"]
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                    rates[name].append(json.loads(out.strip().splitlines()[-1])["pairs_per_s"])
            for name, values in rates.items():
                runs = ", ".join(f"{v:.1f}" for v in values)
                print(f"{size}x{size} {name:12s} {max(values):8.1f} pairs/s (best of {runs}; batch {batch})")
            if args.torch_python:
                for name in ("moco_tf", "moco_tf_crops"):
                    ratio = max(rates[name]) / max(rates["torchvision"])
                    print(f"{size}x{size} {name} / torchvision = {ratio:.2f}x")


if __name__ == "__main__":
    main()
