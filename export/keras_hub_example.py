"""Transfer a moco_tf encoder with KerasHub: a RetinaNet detector and a DeepLabV3 segmenter on the
KerasHub preset that `python -m moco_tf.export --format=keras_hub` writes, each trained a few
steps on a synthetic task this script makes (no download).

    python -m moco_tf.export --model_dir=runs/moco_v2 --export_dir=export/moco_v2_r50_keras_hub --format=keras_hub
    python export/keras_hub_example.py --preset=export/moco_v2_r50_keras_hub [--steps=3] [--image_size=128]

The task: coloured squares on noise. Detection: each square's box, labelled with its colour;
segmentation: each pixel labelled with its square's colour (0: background). This shows the
plumbing works (shapes, losses, `fit`, `predict`); it measures nothing about transfer quality.

Images are 0-255 RGB, normalised as the preset's `pretrained_cfg` says ((x / 255 - mean) / std,
moco_tf's ImageNet constants) before the backbone. Needs keras-hub (moco_tf's extra keras_hub),
not moco_tf.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

COLOURS = np.array([[255, 30, 30], [30, 255, 30], [30, 30, 255]], np.float32)  # classes 0, 1, 2 (detection)


def make_data(count: int, size: int, seed: int = 0):
    """images [N, size, size, 3] in 0-255; one square per image: boxes (yxyx, pixels), labels, masks."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 80, (count, size, size, 3)).astype(np.float32)
    boxes = np.zeros((count, 1, 4), np.float32)
    labels = np.zeros((count, 1), np.int32)
    masks = np.zeros((count, size, size, 1), np.int32)
    for i in range(count):
        side = int(rng.integers(size // 4, size // 2))
        y, x = (int(v) for v in rng.integers(0, size - side, 2))
        colour = int(rng.integers(0, len(COLOURS)))
        images[i, y : y + side, x : x + side] = COLOURS[colour]
        boxes[i, 0] = (y, x, y + side, x + side)
        labels[i, 0] = colour
        masks[i, y : y + side, x : x + side, 0] = colour + 1
    return images, boxes, labels, masks


def normaliser(preset: str):
    with open(os.path.join(preset, "config.json")) as f:
        cfg = json.load(f)["pretrained_cfg"]
    mean, std = np.array(cfg["mean"], np.float32), np.array(cfg["std"], np.float32)
    return lambda images: (images / 255.0 - mean) / std


def detector(preset: str, num_classes: int) -> keras.Model:
    encoder = keras_hub.models.ResNetBackbone.from_preset(preset)
    backbone = keras_hub.models.RetinaNetBackbone(image_encoder=encoder, min_level=3, max_level=7, use_p5=False)
    model = keras_hub.models.RetinaNetObjectDetector(backbone=backbone, num_classes=num_classes)
    model.compile(optimizer=keras.optimizers.SGD(0.001, momentum=0.9))  # KerasHub's focal + smooth L1 losses
    return model


def segmenter(preset: str, num_classes: int) -> keras.Model:
    encoder = keras_hub.models.ResNetBackbone.from_preset(preset)
    backbone = keras_hub.models.DeepLabV3Backbone(
        image_encoder=encoder,
        spatial_pyramid_pooling_key="P5",
        low_level_feature_key="P2",
        upsampling_size=8,  # P5 (stride 32) -> P2 (stride 4)
        dilation_rates=[6, 12, 18],
    )
    model = keras_hub.models.DeepLabV3ImageSegmenter(backbone=backbone, num_classes=num_classes)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", required=True, help="a KerasHub preset folder (moco_tf.export --format=keras_hub)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--image_size", type=int, default=128)
    args = parser.parse_args()

    images, boxes, labels, masks = make_data(args.steps * args.batch_size, args.image_size)
    x = normaliser(args.preset)(images)

    model = detector(args.preset, num_classes=len(COLOURS))
    history = model.fit(x, {"boxes": boxes, "labels": labels}, batch_size=args.batch_size, epochs=1, verbose=0)
    found = model.predict(x[:2], verbose=0)
    print(f"retinanet loss {history.history['loss'][-1]:.4f}; predict boxes {tuple(found['boxes'].shape)}")

    model = segmenter(args.preset, num_classes=len(COLOURS) + 1)
    history = model.fit(x, masks, batch_size=args.batch_size, epochs=1, verbose=0)
    logits = model.predict(x[:2], verbose=0)
    print(f"deeplabv3 loss {history.history['loss'][-1]:.4f}; predict logits {tuple(logits.shape)}")


if __name__ == "__main__":
    main()
