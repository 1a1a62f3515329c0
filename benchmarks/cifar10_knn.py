"""Learning quality on real CIFAR-10: moco_tf's MoCo step against a PyTorch reference, by kNN top-1.

    .venv/bin/python benchmarks/cifar10_knn.py [--train_images=50000 --test_images=10000 --steps=N --seeds=0,1]

Recipe: the official CIFAR-10 demo (facebookresearch/moco colab/moco_cifar10_demo.ipynb):
ResNet-18 with the CIFAR stem, v1 head dim 128, K 4096, m 0.99, T 0.1, SplitBatchNorm with 8
groups and key shuffling, SGD momentum 0.9, wd 5e-4, lr 0.06 per 512 images (scaled to the
batch), cosine; kNN k=200, t=0.1 on the train features. Scaled to a CPU budget by the flags:
fewer steps, a class-balanced subset of the train/test images, a smaller batch. Views are the
v2 augmentation of moco_tf (the demo's is v2 without blur).

For each seed, both frameworks start from the same weights and queue (copied moco_tf -> torch)
and train on the same precomputed views, so the comparison isolates the training step; the
torch side is builder.py's step (tests/torch_reference.py) with the demo's single-GPU key
shuffle. Reported: kNN top-1 of the random-initialised encoder, of moco_tf's and of PyTorch's
after training, and a linear classifier (lincls: fc N(0,0.01), SGD lr 30, x0.1 at 60/80) on
moco_tf's frozen features, precomputed (no augmentation, so not the full official protocol).
"""

from __future__ import annotations

import argparse
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

from moco_tf import data, knn, lincls  # noqa: E402
from moco_tf.model import MoCo  # noqa: E402
from moco_tf.optimizers import SGD  # noqa: E402
from moco_tf.schedules import EpochSchedule, scaled_lr  # noqa: E402
from tests import torch_reference as ref  # noqa: E402

CIFAR10_TAR = os.path.join(ROOT, "..", "shared", "datasets", "cifar10-jpg.tar.gz")
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


def knn_top1(backbone_fn, source, batch: int) -> float:
    train = data.labelled_dataset(source, "train", 32, batch)
    test = data.labelled_dataset(source, "test", 32, batch)
    return knn.evaluate(backbone_fn, train, test, k=200, t=0.1, num_classes=10).top1


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


def train_torch(model: MoCo, views: np.ndarray, lrs: list[float], seed: int) -> torch.nn.Module:
    """The official step from moco_tf's initial state, with the demo's single-GPU key shuffle."""
    torch.manual_seed(seed)

    def encoder():
        return ref.ResNet(18, fc=ref.moco_head(512, DIM, False), cifar_stem=True, groups=BN_GROUPS)

    encoder_q, encoder_k = encoder(), encoder()
    ref.load_into_torch(encoder_q, ref.tf_encoder_state(model.encoder_q))
    ref.load_into_torch(encoder_k, ref.tf_encoder_state(model.encoder_k))
    official = ref.OfficialMoCo(encoder_q, encoder_k, torch.from_numpy(np.asarray(model.queue).T.copy()), M, T)
    official.train()
    encoder_k_forward = encoder_k.forward

    def shuffled_forward(x):  # moco_cifar10_demo: _batch_shuffle_single_gpu / _batch_unshuffle_single_gpu
        idx = torch.randperm(x.shape[0])
        return encoder_k_forward(x[idx])[torch.argsort(idx)]

    encoder_k.forward = shuffled_forward
    optimizer = torch.optim.SGD(encoder_q.parameters(), lrs[0], momentum=0.9, weight_decay=WD)
    criterion = torch.nn.CrossEntropyLoss()
    for step, batch in enumerate(views):
        for group in optimizer.param_groups:
            group["lr"] = lrs[step]
        im = torch.from_numpy(batch.transpose(0, 1, 4, 2, 3).copy())
        logits, labels = official(im[:, 0], im[:, 1])
        loss = criterion(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    encoder_k.forward = encoder_k_forward
    return encoder_q


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train_images", type=int, default=50000, help="class-balanced train subset (bank too)")
    parser.add_argument("--test_images", type=int, default=10000, help="class-balanced test subset")
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--epochs", type=float, default=200, help="cosine length, in passes over the subset")
    parser.add_argument("--steps", type=int, default=0, help="stop after N steps (0: all epochs); the CPU budget")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--frameworks", default="moco_tf,torch")
    parser.add_argument("--lincls_epochs", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    frameworks = args.frameworks.split(",")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"tensorflow {tf.__version__}, torch {torch.__version__}")  # fmt: skip
    print(f"args: {vars(args)}")
    with tempfile.TemporaryDirectory() as tmp:
        root = extract_subset(tmp, args.train_images // 10, args.test_images // 10)
        source = data.make_source("folder", root)
        n = source.num_examples("train")
        steps_per_epoch = n // args.batch_size
        total = int(args.epochs * steps_per_epoch)
        steps = min(total, args.steps) if args.steps else total
        lr = scaled_lr(LR_PER_256, args.batch_size)
        schedule = EpochSchedule(lr, steps_per_epoch, max(1, math.ceil(args.epochs)), "cosine")
        lrs = [float(schedule(s)) for s in range(steps)]
        print(f"{n} train / {source.num_examples('test')} test images; {steps} steps of batch {args.batch_size} "
              f"({steps / steps_per_epoch:.2f} epochs of a {args.epochs}-epoch cosine from lr {lr:.4g})")  # fmt: skip
        rows = []
        for seed in (int(s) for s in args.seeds.split(",")):
            keras.utils.set_random_seed(seed)
            model = MoCo("resnet18", dim=DIM, queue_size=QUEUE, momentum=M, temperature=T, cifar_stem=True,
                         bn_groups=BN_GROUPS, shuffle_bn=True)  # fmt: skip
            row = {"seed": seed}
            start = time.time()
            row["random"] = knn_top1(model.backbone_q, source, 256)
            print(f"seed {seed}: random init kNN top-1 {row['random']:.2f}% ({time.time() - start:.0f} s)")
            views = np.stack([v.numpy() for v in data.pretrain_dataset(source, "train", 32, "v2", args.batch_size,
                                                                       seed=seed).take(steps)])  # fmt: skip
            if "torch" in frameworks:
                start = time.time()
                encoder = train_torch(model, views, lrs, seed)
                row["torch_s"] = time.time() - start
                row["torch"] = knn_top1(torch_backbone_fn(encoder), source, 256)
                print(f"seed {seed}: PyTorch  kNN top-1 {row['torch']:.2f}% (train {row['torch_s']:.0f} s)")
            if "moco_tf" in frameworks:
                model.compile(optimizer=SGD(EpochSchedule(lr, steps_per_epoch, max(1, math.ceil(args.epochs)),
                                                          "cosine"), momentum=0.9, weight_decay=WD))  # fmt: skip
                start = time.time()
                views_ds = tf.data.Dataset.from_tensor_slices(views)
                model.fit(views_ds, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False)
                row["moco_tf_s"] = time.time() - start
                row["moco_tf"] = knn_top1(model.backbone_q, source, 256)
                print(f"seed {seed}: moco_tf  kNN top-1 {row['moco_tf']:.2f}% (train {row['moco_tf_s']:.0f} s)")
                train = data.labelled_dataset(source, "train", 32, 256)
                test = data.labelled_dataset(source, "test", 32, 256)
                train_f, test_f = (lincls.feature_dataset(model.backbone_q, d, 256, shuffle=s, seed=seed)
                                   for d, s in ((train, True), (test, False)))  # fmt: skip
                classifier, _ = lincls.train_linear(None, train_f[0], test_f[0], 10, math.ceil(train_f[1] / 256),
                                                    epochs=args.lincls_epochs, log=lambda _: None)  # fmt: skip
                row["lincls"] = lincls.evaluate(classifier, test_f[0])["top1"]
                print(f"seed {seed}: moco_tf  linear top-1 {row['lincls']:.2f}% (precomputed features)")
            rows.append(row)
        print("\n| seed | random init kNN | moco_tf kNN | PyTorch kNN | moco_tf linear (precomputed) |")
        print("|---|---|---|---|---|")
        for r in rows:
            cells = [f"{r[k]:.2f}" if k in r else "-" for k in ("random", "moco_tf", "torch", "lincls")]
            print(f"| {r['seed']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
