"""A run's training curves from its TensorBoard event files, as one PNG (`python -m moco_tf.plot`).

What training writes under model_dir/logs:
- logs/train (Keras's TensorBoard callback): `batch_<metric>` every --log_every steps, at the
  optimizer step; `epoch_<metric>` once per epoch, at the epoch index (0-based).
  Metrics: loss, acc (contrastive top-1: the positive beats every queue key), logit_pos,
  logit_neg (mean cosines), img_per_s; batch values are the epoch's running means so far (Keras
  resets its metrics each epoch, so they jump at epoch starts); per epoch also lr (TrainingLogs)
  and knn_top1 when the monitor ran; self_neg where the model reports it.
- logs/knn (KNNMonitor): knn_top1, knn_top5 at the number of epochs done (1-based).

Everything is drawn against the optimizer step: epoch-level values at the step that ends their
epoch (steps per epoch from config.json and the data, else from the event times).
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import os
from collections.abc import Mapping

import numpy as np
import tensorflow as tf

from moco_tf import outputs
from moco_tf.errors import UserError

# (panel title, series drawn in it); a series is "<run>/<tag>" as `read_scalars` names it.
PANELS = (
    ("InfoNCE loss", ("train/batch_loss", "train/epoch_loss")),
    ("contrastive accuracy", ("train/batch_acc", "train/epoch_acc")),
    ("positive / negative cosine", ("train/batch_logit_pos", "train/batch_logit_neg")),
    ("learning rate", ("train/epoch_lr",)),
    ("kNN top-1 (%)", ("knn/knn_top1",)),
    ("self_neg (own image among the negatives)", ("train/batch_self_neg", "train/epoch_self_neg")),
)
OPTIONAL_PANELS = ("self_neg (own image among the negatives)",)  # drawn only when the run logged it


class NoEventsError(UserError):
    """The folder holds no TensorBoard scalars to draw."""


@dataclasses.dataclass
class Series:
    steps: np.ndarray  # as logged (optimizer step, epoch index, epochs done)
    values: np.ndarray
    wall_times: np.ndarray


def read_scalars(log_dir: str) -> dict[str, Series]:
    """Every scalar under log_dir, as "<sub-folder>/<tag>" -> Series (sorted by wall time)."""
    found: dict[str, list[tuple[float, int, float]]] = {}
    for path in sorted(glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True)):
        run = os.path.relpath(os.path.dirname(path), log_dir).replace(os.sep, "/")
        for record in tf.data.TFRecordDataset(path):  # (summary_iterator warns it is deprecated)
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                number = _scalar(value)
                if number is not None:
                    found.setdefault(f"{run}/{value.tag}", []).append((event.wall_time, event.step, number))
    out = {}
    for name, rows in found.items():
        rows.sort(key=lambda r: r[0])
        wall, steps, values = (np.array(c) for c in zip(*rows, strict=True))
        out[name] = Series(steps.astype(np.int64), values.astype(np.float64), wall.astype(np.float64))
    return out


def _scalar(value) -> float | None:
    if value.HasField("simple_value"):
        return float(value.simple_value)
    if value.HasField("tensor") and value.metadata.plugin_data.plugin_name == "scalars":
        array = tf.make_ndarray(value.tensor)
        return float(array) if array.size == 1 else None
    return None


def by_step(steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted by step; where a step was logged twice (a run resumed from an earlier checkpoint
    redoes the steps after it), the later value wins. Input in wall-time order."""
    last = {int(step): value for step, value in zip(steps, values, strict=True)}
    order = sorted(last)
    return np.array(order, np.int64), np.array([last[s] for s in order], np.float64)


def steps_per_epoch(model_dir: str) -> int | None:
    """From config.json: --steps_per_epoch, or the pretraining split's images // batch_size; None
    when it cannot be told (no config, data not readable here)."""
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            config = json.load(f)
        runtime, optim, data = config.get("runtime", {}), config["optim"], config["data"]
        if runtime.get("steps_per_epoch"):
            return int(runtime["steps_per_epoch"])
        from moco_tf.data import sources  # only when needed: it builds TFDS

        source = sources.make_source(data["dataset"], data.get("data_dir"))
        return max(1, source.num_examples(source.pretrain_split) // int(optim["batch_size"]))
    except Exception:  # noqa: BLE001 - any failure: fall back to the event times
        return None


def curves(model_dir: str, steps_per_epoch_: int | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """"<run>/<tag>" -> (optimizer steps, values) for every scalar of the run under model_dir/logs.

    Raises NoEventsError when there are none."""
    log_dir = os.path.join(model_dir, "logs")
    scalars = read_scalars(log_dir) if os.path.isdir(log_dir) else {}
    if not scalars:
        raise NoEventsError(f"{model_dir} holds no TensorBoard scalars (no {log_dir}/**/events.out.tfevents.*)")
    batch = {k: v for k, v in scalars.items() if "/batch_" in k}
    out = {k: by_step(v.steps, v.values) for k, v in batch.items()}
    spe = steps_per_epoch_ or steps_per_epoch(model_dir)
    clock = _clock(batch)  # wall time -> step, for when steps per epoch are unknown
    for name, series in scalars.items():
        if name in batch:
            continue
        epochs_done = series.steps + (0 if name.startswith("knn/") else 1)  # epoch_*: 0-based index
        if spe:
            steps = epochs_done * spe
        elif clock is not None:
            steps = np.round(np.interp(series.wall_times, *clock)).astype(np.int64)
        else:
            steps = epochs_done
        out[name] = by_step(steps, series.values)
    return out


def _clock(batch: Mapping[str, Series]) -> tuple[np.ndarray, np.ndarray] | None:
    if not batch:
        return None
    longest = max(batch.values(), key=lambda s: len(s.steps))
    return longest.wall_times, longest.steps.astype(np.float64)


def plot(model_dir: str, out: str, title: str | None = None, steps_per_epoch_: int | None = None) -> list[str]:
    """Draws the run's curves into the PNG `out`; returns the panel titles drawn."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    data = curves(model_dir, steps_per_epoch_)
    panels = [(t, s) for t, s in PANELS if t not in OPTIONAL_PANELS or any(n in data for n in s)]
    columns = 3
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.8 * rows), squeeze=False)
    for ax, (panel, names) in zip(axes.flat, panels, strict=False):
        for name in names:
            if name in data:
                steps, values = data[name]
                style = {"marker": "o", "linestyle": "-"} if len(steps) < 30 else {"linewidth": 1}
                ax.plot(steps, values, label=name.split("/", 1)[1], **style)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(title or os.path.basename(os.path.normpath(model_dir)), fontsize=11)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, metadata={"Software": None})  # ours is outputs' marker
    plt.close(fig)
    outputs.write_png(out, buffer.getvalue())  # atomic: a kill leaves the previous plot or this one
    return [t for t, _ in panels]
