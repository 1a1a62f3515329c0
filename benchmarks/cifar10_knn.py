"""Learning quality on real CIFAR-10: moco_tf's MoCo step against a PyTorch reference, by kNN top-1.

    .venv/bin/python benchmarks/cifar10_knn.py [--width=16 --epochs=10 --batch_size=256 --seeds=0,1 --threads=1]

Recipe: the official CIFAR-10 demo (facebookresearch/moco colab/moco_cifar10_demo.ipynb):
ResNet-18 with the CIFAR stem, v1 head dim 128, K 4096, m 0.99, T 0.1, SplitBatchNorm with 8
groups and key shuffling, SGD momentum 0.9, wd 5e-4, lr 0.06 per 512 images (scaled to the
batch), cosine; kNN k=200, t=0.1 on the train features. Scaled to a CPU budget by the flags:
a narrower ResNet (--width), fewer epochs or steps, a class-balanced subset of the train/test
images, a smaller batch. Views are the v2 augmentation of moco_tf (the demo's is v2 without blur).

For each seed, both frameworks start from the same weights and queue (copied moco_tf -> torch)
and train in lockstep on one stream of views (each batch goes to both), so the comparison
isolates the training step; the torch side is builder.py's step with the demo's single-GPU key
shuffle (tests/torch_reference.DemoTrainer). Seeds can run as separate processes (--seeds=N);
each writes OUT/seedN.json and OUT/export_seedN (the moco_tf encoder as a TF-Hub export, for
`python -m moco_tf.lincls`). Reported: kNN top-1 of the random-initialised encoder, of moco_tf's and of PyTorch's
after training, and a linear classifier (lincls: fc N(0,0.01), SGD lr 30, x0.1 at 60/80) on
moco_tf's frozen features, precomputed (no augmentation, so not the full official protocol).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tarfile
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import torch  # noqa: E402

from moco_tf.data import pipelines, sources  # noqa: E402
from moco_tf.evaluation import knn, linear  # noqa: E402
from moco_tf.interop import hub  # noqa: E402
from moco_tf.models.moco import MoCo  # noqa: E402
from moco_tf.training.optimizers import SGD  # noqa: E402
from moco_tf.training.schedules import EpochSchedule, scaled_lr  # noqa: E402
from tests.support import torch_reference as ref  # noqa: E402

# The real CIFAR-10 JPEGs: the folder named by MOCO_TF_DATASETS (as for the tests), default ../shared/datasets.
CIFAR10_TAR = os.path.join(
    os.environ.get("MOCO_TF_DATASETS", os.path.join(ROOT, "..", "shared", "datasets")), "cifar10-jpg.tar.gz"
)
DIM, QUEUE, M, T, BN_GROUPS, WD, LR_PER_256 = 128, 4096, 0.99, 0.1, 8, 5e-4, 0.03


def extract_subset(root: str, train_per_class: int, test_per_class: int) -> str:
    """The first N images of each class of each split, as an image folder (train/ test/)."""
    limits = {"train": train_per_class, "test": test_per_class}
    with tarfile.open(CIFAR10_TAR) as tar:
        members = []
        for member in tar.getmembers():
            parts = member.name.split("/")
            if member.isfile() and len(parts) >= 3 and parts[-3] in limits:
                if int(os.path.splitext(parts[-1])[0]) < limits[parts[-3]]:
                    members.append(member)
        tar.extractall(root, members=members, filter="data")
    tops = {m.name.split("/")[0] for m in members}
    return os.path.join(root, tops.pop()) if len(tops) == 1 and tops != {"train", "test"} else root


def features(backbone_fn, source, batch: int = 256):
    """(train features, train labels, test features, test labels) under the eval transform."""
    train = pipelines.labelled_dataset(source, "train", 32, batch)
    test = pipelines.labelled_dataset(source, "test", 32, batch)
    return (*knn.extract_features(backbone_fn, train), *knn.extract_features(backbone_fn, test))


def knn_top1(train_x, train_y, test_x, test_y) -> float:
    return knn.knn_accuracy(train_x, train_y, test_x, test_y, k=200, t=0.1, num_classes=10)["top1"]


def torch_backbone_fn(encoder: torch.nn.Module):
    """images NHWC normalised -> pooled features, the torch encoder in eval mode without its fc."""
    fc = encoder.fc

    def fn(images):
        encoder.eval()
        encoder.fc = torch.nn.Identity()
        with torch.no_grad():
            out = encoder(torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy())).numpy()
        encoder.fc = fc
        return tf.constant(out)

    return lambda images: tf.py_function(fn, [images], tf.float32)


def run_seed(seed: int, source, args, lr: float, steps_per_epoch: int, steps: int, out_dir: str) -> dict:
    """Both frameworks in lockstep on one stream of views: the same batch goes to each in turn."""
    keras.utils.set_random_seed(seed)
    epochs = max(1, math.ceil(args.epochs))
    model = MoCo("resnet18", dim=DIM, queue_size=QUEUE, moco_momentum=M, temperature=T, cifar_stem=True,
                 bn_groups=BN_GROUPS, shuffle_bn=True, width=args.width)  # fmt: skip
    schedule = EpochSchedule(lr, steps_per_epoch, epochs, "cosine")
    model.compile(optimizer=SGD(schedule, momentum=0.9, weight_decay=WD))
    row = {"seed": seed}
    start = time.time()
    row["random"] = knn_top1(*features(model.backbone_q, source))
    print(f"seed {seed}: random init kNN top-1 {row['random']:.2f}% ({time.time() - start:.0f} s)", flush=True)
    torch_moco = ref.DemoTrainer(model, float(schedule(0)), WD, seed) if "torch" in args.frameworks else None
    train_tf = "moco_tf" in args.frameworks
    views_stream = iter(pipelines.pretrain_dataset(source, "train", 32, "v2", args.batch_size, seed=seed))
    seconds = {"moco_tf": 0.0, "torch": 0.0}
    losses = {"moco_tf": [], "torch": []}
    for step in range(steps):
        views = next(views_stream)["views"].numpy()
        if train_tf:
            start = time.time()
            losses["moco_tf"].append(float(model.train_on_batch(views, return_dict=True)["loss"]))
            seconds["moco_tf"] += time.time() - start
        if torch_moco is not None:
            start = time.time()
            losses["torch"].append(torch_moco.step(views, float(schedule(step))).item())
            seconds["torch"] += time.time() - start
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            recent = {k: np.mean(v[-args.log_every:]) for k, v in losses.items() if v}
            print(f"seed {seed}: step {step + 1}/{steps} (epoch {(step + 1) / steps_per_epoch:.2f}) loss "
                  + ", ".join(f"{k} {v:.4f}" for k, v in recent.items())
                  + " | s/step " + ", ".join(f"{k} {seconds[k] / (step + 1):.3f}" for k in recent), flush=True)
    for name in ("moco_tf", "torch"):
        if losses[name]:
            row[f"{name}_s_per_step"] = seconds[name] / steps
            row[f"{name}_final_loss"] = float(np.mean(losses[name][-steps_per_epoch:]))
    if torch_moco is not None:
        row["torch"] = knn_top1(*features(torch_backbone_fn(torch_moco.encoder_q), source))
        print(f"seed {seed}: PyTorch  kNN top-1 {row['torch']:.2f}%", flush=True)
    if train_tf:
        # One feature extraction serves the kNN number and the linear classifier.
        train_x, train_y, test_x, test_y = features(model.backbone_q, source)
        row["moco_tf"] = knn_top1(train_x, train_y, test_x, test_y)
        print(f"seed {seed}: moco_tf  kNN top-1 {row['moco_tf']:.2f}%", flush=True)
        # The trained encoder as a TF-Hub export, for the lincls CLI (the full protocol) afterwards.
        about = {"dataset": "cifar10", "aug": "v2", "epochs": args.epochs}
        row["export"] = hub.export_moco(model, os.path.join(out_dir, f"export_seed{seed}"), about, overwrite=True)
        train_f = linear.batched_features(train_x, train_y, 256, shuffle=True, seed=seed)
        test_f = linear.batched_features(test_x, test_y, 256, shuffle=False)
        classifier, _ = linear.train_linear(None, train_f, test_f, 10, math.ceil(len(train_y) / 256),
                                            epochs=args.lincls_epochs, log=lambda _: None)  # fmt: skip
        row["lincls"] = linear.evaluate(classifier, test_f)["top1"]
        print(f"seed {seed}: moco_tf  linear top-1 {row['lincls']:.2f}% (precomputed features)", flush=True)
    with open(os.path.join(out_dir, f"seed{seed}.json"), "w") as f:
        json.dump(row, f, indent=1)
    return row


def print_table(out_dir: str) -> None:
    """The table of every seed{N}.json under out_dir (seeds may run as separate processes)."""
    rows = []
    for name in sorted(os.listdir(out_dir)):
        if name.startswith("seed") and name.endswith(".json"):
            with open(os.path.join(out_dir, name)) as f:
                rows.append(json.load(f))
    keys = ("random", "moco_tf", "torch", "lincls")
    print("\n| seed | random init kNN | moco_tf kNN | PyTorch kNN | moco_tf linear (precomputed) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | " + " | ".join(f"{r[k]:.2f}" if k in r else "-" for k in keys) + " |")
    if len(rows) > 1:
        means = [np.mean([r[k] for r in rows]) if all(k in r for r in rows) else None for k in keys]
        print("| mean | " + " | ".join(f"{m:.2f}" if m is not None else "-" for m in means) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train_images", type=int, default=50000, help="class-balanced train subset (bank too)")
    parser.add_argument("--test_images", type=int, default=10000, help="class-balanced test subset")
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--width", type=int, default=64, help="ResNet-18 base channels (64 standard)")
    parser.add_argument("--epochs", type=float, default=200, help="cosine length, in passes over the subset")
    parser.add_argument("--steps", type=int, default=0, help="stop after N steps (0: all epochs); the CPU budget")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--frameworks", default="moco_tf,torch")
    parser.add_argument("--lincls_epochs", type=int, default=100)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for each framework (0: all cores)")
    parser.add_argument("--log_every", type=int, default=50, help="print the mean losses every N steps")
    parser.add_argument("--out", default="benchmarks/out/cifar10_knn", help="per-seed results and exports")
    args = parser.parse_args()
    args.frameworks = args.frameworks.split(",")
    threads = args.threads or os.cpu_count() or 1
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    torch.set_num_threads(threads)
    os.makedirs(args.out, exist_ok=True)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"tensorflow {tf.__version__}, torch {torch.__version__}")  # fmt: skip
    print(f"args: {vars(args)}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = extract_subset(tmp, args.train_images // 10, args.test_images // 10)
        source = sources.make_source("folder", root)
        n = source.num_examples("train")
        steps_per_epoch = n // args.batch_size
        total = int(args.epochs * steps_per_epoch)
        steps = min(total, args.steps) if args.steps else total
        lr = scaled_lr(LR_PER_256, args.batch_size)
        print(f"{n} train / {source.num_examples('test')} test images; {steps} steps of batch {args.batch_size} "
              f"({steps / steps_per_epoch:.2f} epochs of a {args.epochs}-epoch cosine from lr {lr:.4g})",
              flush=True)  # fmt: skip
        for seed in (int(s) for s in args.seeds.split(",")):
            run_seed(seed, source, args, lr, steps_per_epoch, steps, args.out)
    print_table(args.out)


if __name__ == "__main__":
    main()
