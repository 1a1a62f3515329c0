"""Transfer to detection, measured: MoCo pretraining on unlabelled crops of aerial scenes, then a
KerasHub RetinaNet fine-tuned on the scenes' tree-crown boxes, from the moco_tf encoder against
random init, AP on held-out pixels.

    .venv/bin/python benchmarks/transfer_detection.py [--cache_dir=~/.cache/moco_tf/deepforest]
        [--out_dir=benchmarks/out/transfer_detection] [--seeds=0,1] [--pretrain_epochs=30]
        [--finetune_steps=300] [--tile=128] ...

Data: the `deepforest` 2.1.0 wheel (MIT; NEON aerial RGB imagery, which NEON publishes as CC0),
fetched with `pip download deepforest==2.1.0 --no-deps` into --cache_dir (outside the repository)
and read as a zip: its four RGB images with Pascal VOC boxes of tree crowns (one class, "tree";
SOAP_061's "Alive" / "Dead" count as tree).

Split (fixed, stated in RESULTS.md):
- training: the top 75% of the rows of the two Yellowstone scenes 2019_YELL_2_528000_4978000
  (2299 x 2472 px) and 2019_YELL_2_541000_4977000 (1249 x 1035 px); a box belongs to a part by
  its centre and is clipped to that part;
- held-out A (same site): the bottom 25% of the rows of the same two scenes;
- held-out B (other sites): the 400 x 400 tiles OSBS_029 (Florida) and SOAP_061 (California).
No held-out pixel is in the pretraining crops or the fine-tuning tiles; nothing is tuned on the
held-out parts (they are evaluated once, at the end of each fine-tune).

Steps:
1. crops: --crop px squares on a grid of stride --crop_stride over the training parts, written as
   PNG files into CACHE/crops (an unlabelled `--dataset=folder`: images directly in the folder);
2. pretraining: `python -m moco_tf.train` on them (MoCo v2: ResNet-18 at width 64, the ImageNet
   stem, as KerasHub's ResNetBackbone requires; --pretrain_* flags), then
   `python -m moco_tf.export --format=keras_hub` into CACHE/preset;
3. fine-tuning, for each seed and each init (moco: `ResNetBackbone.from_preset`; random: the same
   backbone config with fresh weights): `RetinaNetObjectDetector` (P3-P7, --head_convs conv
   layers per head) on random --tile px tiles of the training parts (flips, 90-degree rotations),
   --finetune_steps steps of --finetune_batch, Adam at --finetune_lr with a cosine decay, every
   weight trains; the same schedule for both inits;
4. evaluation: each held-out image in --tile px windows at half-tile stride, NMS at IoU 0.5 per
   window (up to 300 detections at score >= 0.01) and over the image (`detect`); AP50 and
   AP@[.5:.95] (`average_precision`) over the boxes of each held-out set.

Writes OUT_DIR/results.json (config, commands, wall times, one row per fine-tune) and prints a
markdown table. Every step prints progress; the pretraining and export run as subprocesses whose
command lines are printed and recorded.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
import zipfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEEL = "deepforest==2.1.0"
DATA = "deepforest/data/"
SCENES = ("2019_YELL_2_528000_4978000_image_crop2", "2019_YELL_2_541000_4977000_image_crop")
OTHER_SITES = ("OSBS_029", "SOAP_061")
TRAIN_SHARE = 0.75  # rows [0, 0.75 H) train, [0.75 H, H) held out
MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # moco_tf's (and the preset's) ImageNet constants
STD = np.array([0.229, 0.224, 0.225], np.float32)


# --------------------------------------------------------------------------------------------
# Average precision (numpy only: the unit test imports this module without TensorFlow)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes a [N, 4] and b [M, 4], both (x1, y1, x2, y2) in pixels: [N, M]."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=-1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def average_precision(detections, ground_truth, iou_threshold: float = 0.5) -> float:
    """Single-class AP over a set of images, VOC style (all-point interpolation, VOC 2010+).

    detections: per image, (boxes [N, 4], scores [N]); ground_truth: per image, boxes [M, 4];
    boxes (x1, y1, x2, y2). Detections of all images are ranked by score; each, in turn, is a
    true positive when its best-overlapping ground-truth box of its image has IoU >= the
    threshold and is not yet taken, else a false positive (the VOC devkit's rule). AP is the area
    under the precision-recall curve made monotone (precision at recall r: the best precision at
    any recall >= r). No ground truth at all: nan.
    """
    n_gt = sum(len(np.asarray(g).reshape(-1, 4)) for g in ground_truth)
    if n_gt == 0:
        return float("nan")
    records = []  # (score, image, detection index)
    for i, (_, scores) in enumerate(detections):
        for j, s in enumerate(np.asarray(scores).reshape(-1)):
            records.append((-float(s), i, j))
    records.sort()
    ious = [box_iou(d[0], g) for d, g in zip(detections, ground_truth, strict=True)]
    taken = [np.zeros(len(np.asarray(g).reshape(-1, 4)), bool) for g in ground_truth]
    tp = np.zeros(len(records))
    for r, (_, i, j) in enumerate(records):
        if ious[i].shape[1] == 0:
            continue
        best = int(np.argmax(ious[i][j]))
        if ious[i][j, best] >= iou_threshold and not taken[i][best]:
            taken[i][best] = True
            tp[r] = 1
    if not len(records):
        return 0.0
    tp_cum = np.cumsum(tp)
    recall = tp_cum / n_gt
    precision = tp_cum / np.arange(1, len(records) + 1)
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.nonzero(recall[1:] != recall[:-1])[0]
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


def coco_ap(detections, ground_truth) -> float:
    """Mean of `average_precision` at IoU 0.50, 0.55, ..., 0.95 (COCO's AP thresholds; all-point
    interpolation and the VOC matching rule, not pycocotools' 101 points)."""
    return float(np.mean([average_precision(detections, ground_truth, t) for t in np.linspace(0.5, 0.95, 10)]))


# --------------------------------------------------------------------------------------------
# Data


def fetch_wheel(cache_dir: str) -> str:
    """The deepforest wheel in cache_dir, downloaded (no dependencies, nothing installed) if absent."""
    found = sorted(glob.glob(os.path.join(cache_dir, "deepforest-2.1.0-*.whl")))
    if found:
        return found[0]
    os.makedirs(cache_dir, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "-d", cache_dir]
    print("fetching:", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return sorted(glob.glob(os.path.join(cache_dir, "deepforest-2.1.0-*.whl")))[0]


def read_image(wheel: zipfile.ZipFile, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 [H, W, 3], boxes float32 [N, 4] as x1, y1, x2, y2) of one annotated image."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    with Image.open(io.BytesIO(wheel.read(f"{DATA}{name}.png"))) as img:
        image = np.asarray(img.convert("RGB"))
    root = ET.fromstring(wheel.read(f"{DATA}{name}.xml"))
    boxes = [
        [float(o.find("bndbox").find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")] for o in root.iter("object")
    ]
    return image, np.array(boxes, np.float32).reshape(-1, 4)


def cut_rows(image, boxes, start: int, stop: int):
    """Rows [start, stop) of the image and its boxes whose centre lies there, clipped, shifted."""
    centre = (boxes[:, 1] + boxes[:, 3]) / 2
    keep = boxes[(centre >= start) & (centre < stop)].copy()
    keep[:, [1, 3]] = np.clip(keep[:, [1, 3]], start, stop) - start
    return image[start:stop], keep


def load_split(wheel_path: str):
    """{"train": [(image, boxes)], "heldout_same_site": [...], "heldout_other_sites": [...]}."""
    split = {"train": [], "heldout_same_site": [], "heldout_other_sites": []}
    with zipfile.ZipFile(wheel_path) as wheel:
        for name in SCENES:
            image, boxes = read_image(wheel, name)
            cut = int(round(TRAIN_SHARE * image.shape[0]))
            split["train"].append(cut_rows(image, boxes, 0, cut))
            split["heldout_same_site"].append(cut_rows(image, boxes, cut, image.shape[0]))
        for name in OTHER_SITES:
            split["heldout_other_sites"].append(read_image(wheel, name))
    return split


def write_crops(train, folder: str, size: int, stride: int) -> int:
    """PNG crops of size x size on a grid of `stride` over the training parts; returns the count."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    count = 0
    for s, (image, _) in enumerate(train):
        h, w = image.shape[:2]
        for y in range(0, h - size + 1, stride):
            for x in range(0, w - size + 1, stride):
                path = os.path.join(folder, f"scene{s}_y{y:04d}_x{x:04d}.png")
                if not os.path.exists(path):
                    Image.fromarray(image[y : y + size, x : x + size]).save(path)
                count += 1
    return count


def normalise(images: np.ndarray) -> np.ndarray:
    return ((images.astype(np.float32) / 255.0 - MEAN) / STD).astype(np.float32)


def sample_tiles(train, rng, count: int, tile: int, max_boxes: int):
    """`count` random tile x tile crops of the training parts (scene chosen by area), each flipped
    and rotated at random; boxes kept when at least half of them is inside, clipped; returned as
    KerasHub wants them: images, boxes [count, max_boxes, 4] (y1, x1, y2, x2; -1 padding), labels
    [count, max_boxes] (0: tree; -1 padding)."""
    areas = np.array([img.shape[0] * img.shape[1] for img, _ in train], np.float64)
    images = np.zeros((count, tile, tile, 3), np.uint8)
    out_boxes = -np.ones((count, max_boxes, 4), np.float32)
    labels = -np.ones((count, max_boxes), np.int32)
    for n in range(count):
        image, boxes = train[rng.choice(len(train), p=areas / areas.sum())]
        y = int(rng.integers(0, image.shape[0] - tile + 1))
        x = int(rng.integers(0, image.shape[1] - tile + 1))
        crop = image[y : y + tile, x : x + tile]
        b = boxes - np.array([x, y, x, y], np.float32)
        clipped = np.clip(b, 0, tile)
        area = np.prod(b[:, 2:] - b[:, :2], axis=1)
        inside = np.prod(np.clip(clipped[:, 2:] - clipped[:, :2], 0, None), axis=1)
        b = clipped[inside >= 0.5 * area]
        if rng.random() < 0.5:  # horizontal flip
            crop = crop[:, ::-1]
            b = np.stack([tile - b[:, 2], b[:, 1], tile - b[:, 0], b[:, 3]], axis=1)
        if rng.random() < 0.5:  # vertical flip
            crop = crop[::-1]
            b = np.stack([b[:, 0], tile - b[:, 3], b[:, 2], tile - b[:, 1]], axis=1)
        if rng.random() < 0.5:  # transpose (with the flips: the 8 symmetries of the square)
            crop = crop.transpose(1, 0, 2)
            b = b[:, [1, 0, 3, 2]]
        b = b[:max_boxes]
        images[n] = crop
        out_boxes[n, : len(b)] = b[:, [1, 0, 3, 2]]  # xyxy -> yxyx
        labels[n, : len(b)] = 0
    return images, out_boxes, labels


# --------------------------------------------------------------------------------------------
# Pretraining and export (moco_tf's command lines)


def run_logged(command: list[str], log_path: str) -> float:
    """Run a command with its output into log_path (and its last lines printed); its wall seconds."""
    print("running:", " ".join(command), flush=True)
    start = time.time()
    with open(log_path, "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    seconds = time.time() - start
    with open(log_path) as log:
        tail = log.read().splitlines()[-8:]
    print("\n".join("    " + line for line in tail), flush=True)
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): see {log_path}")
    return seconds


def pretrain_command(args, crops: str, model_dir: str) -> list[str]:
    return [
        sys.executable, "-m", "moco_tf.train",
        "--arch=resnet18", "--width=64", "--dataset=folder", f"--data_dir={crops}",
        f"--image_size={args.pretrain_image_size}", "--aug=v2", "--mlp", "--temperature=0.2", "--noblur",
        f"--crop_min_scale={args.pretrain_crop_min_scale}",
        f"--queue_size={args.pretrain_queue}", f"--batch_size={args.pretrain_batch}",
        f"--epochs={args.pretrain_epochs}", f"--lr={args.pretrain_lr}", "--schedule=cosine",
        "--knn_every=0", "--log_every=10", f"--seed={args.pretrain_seed}", f"--model_dir={model_dir}",
    ]  # fmt: skip


def export_command(model_dir: str, preset: str) -> list[str]:
    return [
        sys.executable, "-m", "moco_tf.export", f"--model_dir={model_dir}", f"--export_dir={preset}",
        "--format=keras_hub", "--overwrite",
    ]  # fmt: skip


# --------------------------------------------------------------------------------------------
# Fine-tuning and evaluation (KerasHub)


def build_detector(preset: str, init: str, args):
    import keras
    import keras_hub
    from keras_hub.layers import NonMaxSuppression

    encoder = keras_hub.models.ResNetBackbone.from_preset(preset)
    if init == "random":  # the same backbone config, fresh weights (drawn from the seed set before)
        encoder = keras_hub.models.ResNetBackbone.from_config(encoder.get_config())
    backbone = keras_hub.models.RetinaNetBackbone(image_encoder=encoder, min_level=3, max_level=7, use_p5=False)
    decoder = NonMaxSuppression(
        bounding_box_format="yxyx", from_logits=True, iou_threshold=0.5, confidence_threshold=0.01, max_detections=300
    )
    model = keras_hub.models.RetinaNetObjectDetector(
        backbone=backbone, num_classes=1, pre_logits_num_conv_layers=args.head_convs, prediction_decoder=decoder
    )
    # RetinaNet's initialisation (Lin et al. 2017, section 4.1): the classification logits start at
    # the prior 0.01 (KerasHub 0.32 puts that bias on the box head's output and leaves the
    # classification head's at 0, i.e. p = 0.5 on every anchor: a loss in the hundreds at step 0).
    cls_out = model.classification_head.prediction_layer
    cls_out.bias.assign(np.full(cls_out.bias.shape, -np.log((1 - 0.01) / 0.01), np.float32))
    model.box_head.prediction_layer.bias.assign(np.zeros(model.box_head.prediction_layer.bias.shape, np.float32))
    schedule = keras.optimizers.schedules.CosineDecay(args.finetune_lr, args.finetune_steps)
    model.compile(optimizer=keras.optimizers.Adam(schedule, global_clipnorm=10.0))  # focal + smooth L1
    return model


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float = 0.5, limit: int = 1000):
    """Greedy non-maximum suppression: indices kept, best score first (at most `limit`)."""
    order = np.argsort(-scores)
    keep = []
    while len(order) and len(keep) < limit:
        i = order[0]
        keep.append(i)
        order = order[1:][box_iou(boxes[i : i + 1], boxes[order[1:]])[0] < iou_threshold]
    return np.array(keep, np.int64)


def window_starts(length: int, tile: int, stride: int) -> list[int]:
    starts = list(range(0, max(length - tile, 0) + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)  # the last window flush with the edge
    return starts


def detect(model, image: np.ndarray, tile: int, batch: int = 32):
    """(boxes [N, 4] x1, y1, x2, y2; scores [N]) on one image: windows of the training tile size
    at half-tile stride (as DeepForest's predict_tile), NMS at IoU 0.5 within each window and then
    over the whole image, boxes under 2 px a side dropped.

    Why windows: run whole (a large image padded to a multiple of 128), KerasHub's RetinaNet
    trained on 128 px tiles gave its top scores (1.0) to zero-width boxes at the image's edge
    and AP50 near 0, where the same model scored AP50 0.14 on held-out 128 px tiles."""
    h, w = image.shape[:2]
    windows = [(y, x) for y in window_starts(h, tile, tile // 2) for x in window_starts(w, tile, tile // 2)]
    all_boxes, all_scores = [], []
    for i in range(0, len(windows), batch):
        chunk = windows[i : i + batch]
        x = np.stack([normalise(image[y : y + tile, x : x + tile]) for y, x in chunk])
        # Eagerly: KerasHub's predict() traces with an unknown image size, which its anchor
        # generator cannot take; here every size is concrete.
        found = model.decode_predictions(model(x, training=False), x)
        boxes, scores = np.asarray(found["boxes"]), np.asarray(found["confidence"])
        counts = np.asarray(found["num_detections"]).reshape(-1)
        for k, (y0, x0) in enumerate(chunk):
            b, s = boxes[k, : counts[k]], scores[k, : counts[k]]
            b = np.clip(b[:, [1, 0, 3, 2]], 0, tile)  # yxyx -> xyxy, inside the window
            big = (b[:, 2] - b[:, 0] >= 2) & (b[:, 3] - b[:, 1] >= 2) & (s > 0)
            all_boxes.append(b[big] + np.array([x0, y0, x0, y0], np.float32))
            all_scores.append(s[big])
    boxes, scores = np.concatenate(all_boxes), np.concatenate(all_scores)
    keep = nms(boxes, scores)
    return boxes[keep], scores[keep]


def evaluate(model, held_out, tile: int) -> dict:
    detections = [detect(model, image, tile) for image, _ in held_out]
    truth = [boxes for _, boxes in held_out]
    return {
        "ap50": average_precision(detections, truth, 0.5),
        "ap75": average_precision(detections, truth, 0.75),
        "ap": coco_ap(detections, truth),
        "boxes": int(sum(len(t) for t in truth)),
        "detections": int(sum(len(d[1]) for d in detections)),
    }


def finetune_one(split, preset: str, init: str, seed: int, args) -> dict:
    import keras

    start = time.time()
    keras.utils.set_random_seed(seed)  # head init, random-init backbone
    model = build_detector(preset, init, args)
    rng = np.random.default_rng(seed)  # tiles and their flips
    losses = []
    done = 0
    while done < args.finetune_steps:
        steps = min(args.steps_per_call, args.finetune_steps - done)
        images, boxes, labels = sample_tiles(split["train"], rng, steps * args.finetune_batch, args.tile, 64)
        history = model.fit(
            normalise(images), {"boxes": boxes, "labels": labels},
            batch_size=args.finetune_batch, epochs=1, verbose=0, shuffle=False,
        )  # fmt: skip
        done += steps
        losses.append(float(history.history["loss"][-1]))
        print(
            f"  [{init} seed {seed}] step {done}/{args.finetune_steps} loss {losses[-1]:.4f} "
            f"({time.time() - start:.0f} s)",
            flush=True,
        )
    train_seconds = time.time() - start
    row = {"init": init, "seed": seed, "final_loss": losses[-1], "losses": losses, "train_seconds": train_seconds}
    for name in ("heldout_same_site", "heldout_other_sites"):
        row[name] = evaluate(model, split[name], args.tile)
    row["eval_seconds"] = time.time() - start - train_seconds
    print(
        f"  [{init} seed {seed}] same site AP50 {row['heldout_same_site']['ap50']:.4f} "
        f"AP {row['heldout_same_site']['ap']:.4f}; other sites AP50 {row['heldout_other_sites']['ap50']:.4f} "
        f"AP {row['heldout_other_sites']['ap']:.4f} ({train_seconds:.0f} s training, "
        f"{row['eval_seconds']:.0f} s evaluation)",
        flush=True,
    )
    return row


def table(rows) -> str:
    lines = [
        "| init | seed | same site AP50 | same site AP | other sites AP50 | other sites AP | loss | fine-tune s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, b = r["heldout_same_site"], r["heldout_other_sites"]
        lines.append(
            f"| {r['init']} | {r['seed']} | {a['ap50']:.4f} | {a['ap']:.4f} | {b['ap50']:.4f} | {b['ap']:.4f} "
            f"| {r['final_loss']:.4f} | {r['train_seconds']:.0f} |"
        )
    for init in sorted({r["init"] for r in rows}):
        mine = [r for r in rows if r["init"] == init]
        mean = {
            k: np.mean([r[s][m] for r in mine])
            for k, (s, m) in {
                "a50": ("heldout_same_site", "ap50"), "a": ("heldout_same_site", "ap"),
                "b50": ("heldout_other_sites", "ap50"), "b": ("heldout_other_sites", "ap"),
            }.items()
        }  # fmt: skip
        lines.append(
            f"| {init} | mean of {len(mine)} | {mean['a50']:.4f} | {mean['a']:.4f} | {mean['b50']:.4f} "
            f"| {mean['b']:.4f} | | |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--cache_dir",
        default=os.path.expanduser("~/.cache/moco_tf/deepforest"),
        help="wheel, crops, pretraining run and preset (outside the repository)",
    )
    parser.add_argument(
        "--out_dir",
        default=os.path.join(ROOT, "benchmarks", "out", "transfer_detection"),
        help="results.json and logs (benchmarks/out is gitignored)",
    )
    parser.add_argument("--seeds", default="0,1", help="fine-tune seeds (head init, random backbone, tiles)")
    parser.add_argument("--inits", default="moco,random", help="moco (the preset) and/or random")
    parser.add_argument("--crop", type=int, default=96, help="side of the unlabelled pretraining crops (px)")
    parser.add_argument("--crop_stride", type=int, default=48, help="grid stride of the crops (px)")
    parser.add_argument("--pretrain_image_size", type=int, default=64, help="moco_tf --image_size")
    parser.add_argument("--pretrain_crop_min_scale", type=float, default=0.2, help="moco_tf --crop_min_scale")
    parser.add_argument("--pretrain_epochs", type=int, default=30, help="moco_tf --epochs")
    parser.add_argument("--pretrain_batch", type=int, default=64, help="moco_tf --batch_size")
    parser.add_argument(
        "--pretrain_queue",
        type=int,
        default=512,
        help="moco_tf --queue_size (keep it under 25%% of the crops: the guardrails)",
    )
    parser.add_argument(
        "--pretrain_lr", type=float, default=0.12, help="moco_tf --lr, per 256 images (scaled by batch/256)"
    )
    parser.add_argument("--pretrain_seed", type=int, default=0)
    parser.add_argument(
        "--skip_pretrain",
        action="store_true",
        help="use the preset already in CACHE/preset (its pretraining time is then not measured)",
    )
    parser.add_argument("--tile", type=int, default=128, help="side of the fine-tuning tiles (px, native scale)")
    parser.add_argument("--finetune_steps", type=int, default=300)
    parser.add_argument("--finetune_batch", type=int, default=8)
    parser.add_argument("--finetune_lr", type=float, default=1e-3, help="Adam learning rate (cosine decay to 0)")
    parser.add_argument(
        "--head_convs",
        type=int,
        default=2,
        help="conv layers in each RetinaNet head before its output (paper: 4; 2 for the CPU budget)",
    )
    parser.add_argument("--steps_per_call", type=int, default=25, help="steps per fit call (one progress line)")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    cache_dir = os.path.abspath(os.path.expanduser(args.cache_dir))
    if os.path.commonpath([cache_dir, ROOT]) == ROOT:
        raise SystemExit(f"--cache_dir={cache_dir} is inside the repository: data is never committed; choose another")
    os.makedirs(args.out_dir, exist_ok=True)
    total_start = time.time()

    wheel = fetch_wheel(cache_dir)
    split = load_split(wheel)
    for name, parts in split.items():
        print(
            f"{name}: {len(parts)} images, {sum(len(b) for _, b in parts)} boxes, "
            f"{sum(i.shape[0] * i.shape[1] for i, _ in parts) / 1e6:.2f} Mpx",
            flush=True,
        )

    crops = os.path.join(cache_dir, f"crops_{args.crop}_s{args.crop_stride}")
    n_crops = write_crops(split["train"], crops, args.crop, args.crop_stride)
    print(f"{n_crops} unlabelled {args.crop} px crops in {crops}", flush=True)
    tag = (
        f"e{args.pretrain_epochs}_i{args.pretrain_image_size}_c{args.crop}_q{args.pretrain_queue}_s{args.pretrain_seed}"
    )
    model_dir = os.path.join(cache_dir, f"moco_{tag}")
    preset = os.path.join(cache_dir, f"preset_{tag}")
    commands = {"pretrain": pretrain_command(args, crops, model_dir), "export": export_command(model_dir, preset)}
    pretrain_seconds = export_seconds = None
    if not args.skip_pretrain:
        pretrain_seconds = run_logged(commands["pretrain"], os.path.join(args.out_dir, "pretrain.log"))
        print(f"pretraining: {pretrain_seconds:.0f} s", flush=True)
        export_seconds = run_logged(commands["export"], os.path.join(args.out_dir, "export.log"))

    rows = []
    out = os.path.join(args.out_dir, "results.json")
    for seed in [int(s) for s in args.seeds.split(",")]:
        for init in args.inits.split(","):
            rows.append(finetune_one(split, preset, init, seed, args))
            with open(out, "w") as f:
                json.dump(
                    {
                        "args": vars(args), "commands": {k: " ".join(v) for k, v in commands.items()},
                        "crops": n_crops, "pretrain_seconds": pretrain_seconds, "export_seconds": export_seconds,
                        "total_seconds": time.time() - total_start, "rows": rows,
                        "split": {k: {"images": len(v), "boxes": int(sum(len(b) for _, b in v))}
                                  for k, v in split.items()},
                        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                    "python": sys.version.split()[0]},
                        "command": " ".join(sys.argv),
                    },
                    f, indent=1,
                )  # fmt: skip
    print(table(rows))
    print(f"total {time.time() - total_start:.0f} s; results in {out}")


if __name__ == "__main__":
    main()
