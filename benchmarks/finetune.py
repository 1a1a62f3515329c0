"""The value of pretraining, measured: fine-tuning on a fraction of CIFAR-10's labels from a moco_tf
encoder against the same recipe from random initialisation.

    .venv/bin/python benchmarks/finetune.py --data_dir=CIFAR10_FOLDERS \
        --pretrained=MODEL_DIR_SEED0,MODEL_DIR_SEED1 [--fractions=0.01,0.1 --seeds=0,1]

Data: the CIFAR-10 JPEG folders DATA_DIR/{train,test}/<class>/*.jpg (`--dataset=folder`). For
each label fraction a class-balanced subset of the 50,000 train images (`moco_tf.data.subsets`,
subset seed 0, the same for every run), evaluation on all 10,000 test images (eval transform).
Recipe: `moco_tf.evaluation.finetune` (SimCLR v1 appendix B.5: Nesterov SGD 0.9, lr 0.05 per 256
images, cosine, no weight decay, RandomResizedCrop + flip; every weight trains, BN in training
mode), what `python -m moco_tf.finetune` runs, with the epochs of --epochs (default the recipe's,
60 at 1% and 30 at 10%; fewer for a CPU budget, and the table says how many). Fine-tune seed s (head
initialisation, data order, augmentation) starts from the s-th --pretrained encoder, or from the
last one given when there are fewer; random init uses the same seed for its weights. Writes OUT
(JSON: one row per run) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import keras  # noqa: E402

from moco_tf.data import pipelines, sources, subsets  # noqa: E402
from moco_tf.evaluation import finetune  # noqa: E402
from moco_tf.models.backbones import BackboneSpec  # noqa: E402
from moco_tf.training.schedules import scaled_lr  # noqa: E402
from moco_tf.weights.pretrained import load_backbone  # noqa: E402


def one_run(source, fraction, init, seed, epochs, batch, spec, weights, limit_val, log) -> dict:
    """Fine-tune once; top-1 / top-5 on the test split and the minutes it took."""
    start = time.time()
    keras.utils.set_random_seed(seed)  # head (and, for random init, backbone) initialisation
    small = subsets.label_subset(source, fraction, seed=0)
    n_train = small.num_examples("train")
    train = pipelines.labelled_dataset(small, "train", 32, batch, train_aug=True, shuffle=True, seed=seed)
    test = pipelines.labelled_dataset(source, source.eval_split, 32, 256, subset=limit_val)
    model = finetune.build_classifier(spec.build, source.num_classes, weights)
    steps = math.ceil(n_train / batch)
    finetune.finetune(
        model, train, test, steps_per_epoch=steps, epochs=epochs, lr=scaled_lr(finetune.BASE_LR, batch),
        eval_every=0, log=log, tensorboard=False,
    )  # fmt: skip  (the test split is evaluated once, below)
    result = finetune.evaluate(model, test)
    return {
        "fraction": fraction, "init": init, "seed": seed, "train_images": n_train, "epochs": epochs,
        "steps": steps * epochs, "batch_size": batch, "top1": result["top1"], "top5": result["top5"],
        "minutes": (time.time() - start) / 60.0,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default="/work/data/cifar10")
    parser.add_argument("--pretrained", required=True, help="comma-separated PATHs (model_dir, export, .pth)")
    parser.add_argument("--fractions", default="0.01,0.1")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--inits", default="pretrained,random")
    parser.add_argument(
        "--epochs", default="0.01:60,0.1:30", help="FRACTION:EPOCHS,... (default: the recipe's, SimCLR v1 B.5)"
    )
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--limit_val", type=int, default=0, help="test images (evenly spaced); 0: all 10,000")
    parser.add_argument("--out", default="finetune_results.json")
    args = parser.parse_args()

    source = sources.make_source("folder", args.data_dir)
    pretrained = [p for p in args.pretrained.split(",") if p]
    loaded = [load_backbone(p) for p in pretrained]
    spec = BackboneSpec.from_dict(loaded[0][1])
    rows = []
    if os.path.exists(args.out):  # go on after an interruption: runs already done are kept
        with open(args.out) as f:
            rows = json.load(f)["runs"]
    header = {
        "pretrained": pretrained, "backbone": spec.to_dict(), "machine": platform.platform(),
        "cpus": os.cpu_count(), "recipe": "moco_tf.evaluation.finetune (SimCLR v1 B.5), lr 0.05 per 256",
    }  # fmt: skip
    epochs_of = {float(k): int(v) for k, v in (item.split(":") for item in args.epochs.split(","))}
    for fraction in [float(f) for f in args.fractions.split(",")]:
        epochs = epochs_of.get(fraction) or finetune.default_epochs(fraction)
        for init in args.inits.split(","):
            for seed in [int(s) for s in args.seeds.split(",")]:
                if any((r["fraction"], r["init"], r["seed"]) == (fraction, init, seed) for r in rows):
                    continue
                which = min(seed, len(loaded) - 1)
                weights = loaded[which][0].model.get_weights() if init == "pretrained" else None
                print(f"== {fraction:g} of the labels, {init} init, seed {seed}, {epochs} epochs", flush=True)
                row = one_run(
                    source, fraction, init, seed, epochs, args.batch_size, spec, weights, args.limit_val,
                    log=lambda line: print("  " + line, flush=True),
                )  # fmt: skip
                if init == "pretrained":
                    row["encoder"] = pretrained[which]
                print(f"   top-1 {row['top1']:.2f}%  top-5 {row['top5']:.2f}%  {row['minutes']:.1f} min", flush=True)
                rows.append(row)
                with open(args.out, "w") as f:
                    json.dump({**header, "runs": rows}, f, indent=2)
    print("\n| labels | init | seed | train images | epochs (steps) | top-1 | top-5 | minutes |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['fraction']:g} | {r['init']} | {r['seed']} | {r['train_images']} | {r['epochs']} ({r['steps']}) "
            f"| {r['top1']:.2f} | {r['top5']:.2f} | {r['minutes']:.1f} |"
        )


if __name__ == "__main__":
    main()
