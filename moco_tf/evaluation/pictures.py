"""Pictures of an evaluation: the retrieval grid (queries and their nearest train images), PNG
files, and TensorBoard scalar and image records written without the tensorboard package."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from moco_tf import outputs
from moco_tf.data.augment import IMAGENET_MEAN, IMAGENET_STD

_RIGHT, _WRONG, _QUERY = (40, 170, 60), (220, 30, 30), (255, 255, 255)


def _to_uint8(images: np.ndarray) -> np.ndarray:
    """Normalised float images (ImageNet mean/std) or uint8 images -> uint8 [..., H, W, 3]."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    x = images * np.array(IMAGENET_STD, np.float32) + np.array(IMAGENET_MEAN, np.float32)
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def retrieval_grid(
    query_images: np.ndarray,
    query_labels: Sequence[int],
    neighbour_images: np.ndarray,
    neighbour_labels: np.ndarray,
    predicted: Sequence[int] | None = None,
    class_names: Sequence[str] = (),
    cell: int = 96,
) -> np.ndarray:
    """A uint8 [H, W, 3] picture: one row per query, the query (white border) followed by its
    nearest train images, each with its label below; neighbours of another class than the query
    have a red border, those of its class a green one. Images are normalised float or uint8."""
    from PIL import Image, ImageDraw

    def name(label) -> str:
        label = int(label)
        return class_names[label] if 0 <= label < len(class_names) else str(label)

    queries, neighbours = _to_uint8(query_images), _to_uint8(neighbour_images)
    rows, cols = len(queries), 1 + neighbours.shape[1]
    border, text_h, gap = 3, 14, 8
    w, h = cell + 2 * border, cell + 2 * border + text_h
    canvas = Image.new("RGB", (cols * w + gap, max(rows, 1) * h), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)

    def paste(image, x, y, color, caption):
        tile = Image.fromarray(image).resize((cell, cell), Image.NEAREST)  # NEAREST: keep 32-px images crisp
        draw.rectangle([x, y, x + w - 1, y + cell + 2 * border - 1], fill=color)
        canvas.paste(tile, (x + border, y + border))
        draw.text((x + border, y + cell + 2 * border), caption[:16], fill=(230, 230, 230))

    for r in range(rows):
        y = r * h
        caption = name(query_labels[r])
        if predicted is not None:
            caption += f" -> {name(predicted[r])}"
        paste(queries[r], 0, y, _QUERY, caption)
        for c in range(neighbours.shape[1]):
            label = neighbour_labels[r][c]
            color = _RIGHT if int(label) == int(query_labels[r]) else _WRONG
            paste(neighbours[r, c], (c + 1) * w + gap, y, color, name(label))
    return np.asarray(canvas)


def write_png(image: np.ndarray, path: str) -> str:
    """Write a uint8 [H, W, 3] image as PNG (any tf.io.gfile path, e.g. gs://), marked as moco_tf's
    and atomically (`moco_tf.outputs`)."""
    return outputs.write_png(path, tf.io.encode_png(image).numpy())


# tf.summary.scalar / image live in the tensorboard package, which training does not need;
# these write the same records (TensorBoard's scalar and image plugin formats) with core TF.
def summary_scalar(tag: str, value: float, step: int) -> None:
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata(data_class=summary_pb2.DATA_CLASS_SCALAR)
    metadata.plugin_data.plugin_name = "scalars"
    tf.summary.write(tag, tf.constant(value, tf.float32), step=step, metadata=metadata)


def summary_image(tag: str, image: np.ndarray, step: int) -> None:
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata(data_class=summary_pb2.DATA_CLASS_BLOB_SEQUENCE)
    metadata.plugin_data.plugin_name = "images"
    height, width = image.shape[:2]
    tensor = tf.stack([tf.as_string(width), tf.as_string(height), tf.io.encode_png(image)])
    tf.summary.write(tag, tensor, step=step, metadata=metadata)
