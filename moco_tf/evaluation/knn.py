"""Weighted kNN evaluation of a frozen encoder, and its Keras monitor callback for training.

The classifier is the official MoCo CIFAR demo's: features are L2-normalised, the memory bank
is the train split's features, each query's k most cosine-similar bank entries vote for their
label with weight exp(similarity / t), and the class with the largest summed weight wins.
Ties (equal similarities, equal class scores) go to the lower index, as `tf.math.top_k` orders
them, so results are deterministic. Queries are processed in blocks, so a 50,000-image bank
against 10,000 queries needs one [block, 50,000] similarity matrix at a time, not all of it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from moco_tf.evaluation.frozen import distributed_fn, inference_fn, is_distributed
from moco_tf.evaluation.pictures import retrieval_grid, summary_image, summary_scalar

# Similarity matrix entries per query block: 2**25 float32 = 128 MiB.
_BLOCK_ENTRIES = 2**25


# ----------------------------------------------------------------------------------------------
# the classifier


def _normalize(x) -> tf.Tensor:
    return tf.math.l2_normalize(tf.convert_to_tensor(x, tf.float32), axis=1)


@tf.function(reduce_retracing=True)
def _block_scores(bank, bank_labels, queries, k, t, num_classes):
    sim = tf.matmul(queries, bank, transpose_b=True)  # [b, N] cosine similarities
    weights, index = tf.math.top_k(sim, k=k)  # ties: the lower bank index first
    labels = tf.gather(bank_labels, index)  # [b, k]
    weights = tf.exp(weights / t)
    rows = tf.shape(queries)[0]
    # Per-class sum of the neighbours' weights, without a [b, k, C] one-hot tensor.
    segment = tf.range(rows)[:, None] * num_classes + labels
    scores = tf.math.unsorted_segment_sum(weights, segment, rows * num_classes)
    return tf.reshape(scores, [rows, num_classes])


def knn_scores(
    train_features,
    train_labels,
    features,
    k: int = 200,
    t: float = 0.1,
    num_classes: int | None = None,
    block_size: int | None = None,
) -> np.ndarray:
    """Per-class weighted votes [len(features), num_classes] of the kNN classifier.

    train_features [N, D] (the memory bank) and features [M, D] need not be normalised; they
    are L2-normalised here. k is capped at N. num_classes defaults to max(train_labels) + 1.
    block_size: queries per block (default: as many as keep one block's similarities ~128 MiB).
    """
    if k < 1 or t <= 0:
        raise ValueError(f"kNN needs k >= 1 and t > 0, got k={k}, t={t}")
    train_labels = np.asarray(train_labels, np.int32).reshape(-1)
    bank = _normalize(train_features)
    if bank.shape[0] != train_labels.shape[0]:
        raise ValueError(f"{bank.shape[0]} train features but {train_labels.shape[0]} train labels")
    if bank.shape[0] == 0:
        raise ValueError("the kNN memory bank is empty")
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1
    queries = _normalize(features)
    n, m = int(bank.shape[0]), int(queries.shape[0])
    block = block_size or max(1, _BLOCK_ENTRIES // n)
    bank_labels = tf.constant(train_labels)
    k = min(int(k), n)
    blocks = [
        _block_scores(bank, bank_labels, queries[i : i + block], k, float(t), int(num_classes)).numpy()
        for i in range(0, m, block)
    ]
    return np.concatenate(blocks) if blocks else np.zeros((0, num_classes), np.float32)


def top_classes(scores: np.ndarray, n: int = 1) -> np.ndarray:
    """The n best classes per row of `scores`, best first; ties go to the lower class index."""
    return tf.math.top_k(scores, k=min(n, scores.shape[1])).indices.numpy()


def knn_predict(
    train_features,
    train_labels,
    features,
    k: int = 200,
    t: float = 0.1,
    num_classes: int | None = None,
    block_size: int | None = None,
) -> np.ndarray:
    """Predicted labels [len(features)] of the weighted kNN classifier (see `knn_scores`)."""
    scores = knn_scores(train_features, train_labels, features, k, t, num_classes, block_size)
    return top_classes(scores, 1)[:, 0]


def accuracy(scores: np.ndarray, labels, topk: Sequence[int] = (1, 5)) -> dict[str, float]:
    """{"top1": ..., "top5": ...} in percent from class scores and true labels."""
    labels = np.asarray(labels).reshape(-1, 1)
    best = top_classes(scores, max(topk))
    return {f"top{n}": float(100.0 * np.mean(np.any(best[:, :n] == labels, axis=1))) for n in topk}


def knn_accuracy(
    train_features,
    train_labels,
    features,
    labels,
    k: int = 200,
    t: float = 0.1,
    num_classes: int | None = None,
) -> dict[str, float]:
    """kNN top-1 and top-5 accuracy (percent) of `features` against the memory bank."""
    return accuracy(knn_scores(train_features, train_labels, features, k, t, num_classes), labels)


# ----------------------------------------------------------------------------------------------
# features


class _NeighbourTracker:
    """The n most similar bank images of a few queries, kept while the bank streams by, so a
    retrieval grid needs no second pass over (and no copy of) the train set."""

    def __init__(self, queries: np.ndarray, n: int):
        self.queries = _normalize(queries).numpy()
        self.n = n
        q = len(self.queries)
        self.sim = np.full((q, 0), -np.inf, np.float32)
        self.images = np.zeros((q, 0, 0, 0, 3), np.float32)
        self.labels = np.zeros((q, 0), np.int64)

    def update(self, features: np.ndarray, images: np.ndarray, labels: np.ndarray) -> None:
        sim = self.queries @ _normalize(features).numpy().T  # [q, b]
        if self.images.shape[1] == 0:
            self.images = np.zeros((len(self.queries), 0, *images.shape[1:]), images.dtype)
        # The batch's own best n per query first, so only [q, 2n] images are ever held.
        best = np.argsort(-sim, axis=1, kind="stable")[:, : self.n]
        all_sim = np.concatenate([self.sim, np.take_along_axis(sim, best, 1)], axis=1)
        all_images = np.concatenate([self.images, images[best]], axis=1)
        all_labels = np.concatenate([self.labels, labels[best]], axis=1)
        keep = np.argsort(-all_sim, axis=1, kind="stable")[:, : self.n]  # stable: earlier wins ties
        self.sim = np.take_along_axis(all_sim, keep, 1)
        self.images = np.take_along_axis(all_images, keep[:, :, None, None, None], 1)
        self.labels = np.take_along_axis(all_labels, keep, 1)


def _local_batches(backbone_fn, dataset: tf.data.Dataset):
    fn = inference_fn(backbone_fn)
    for images, labels in dataset:
        yield fn(images), labels, images


def _distributed_batches(backbone_fn, dataset: tf.data.Dataset, strategy: tf.distribute.Strategy, with_images: bool):
    # DATA: every worker reads the whole input and keeps its batches, so each image counts once
    # (FILE sharding by input file would give workers unequal, file-sized parts).
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    step = distributed_fn(backbone_fn, strategy, with_images)
    for batch in strategy.experimental_distribute_dataset(dataset.with_options(options)):
        out = step(batch)
        yield out[0], out[1], (out[2] if with_images else None)


def extract_features(
    backbone_fn: keras.Model | Callable,
    dataset: tf.data.Dataset,
    keep_images: int = 0,
    tracker: _NeighbourTracker | None = None,
    strategy: tf.distribute.Strategy | None = None,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features [N, D] float32, labels [N]) of a finite (images, labels) dataset, in inference mode.

    keep_images: also return the first `keep_images` images (normalised float), for a grid.
    strategy: with several replicas or workers, each embeds its shard of every batch (the dataset
    holds global batches) and every worker gets all features and labels.
    """
    if is_distributed(strategy):
        batches = _distributed_batches(backbone_fn, dataset, strategy, bool(keep_images or tracker))
    else:
        batches = _local_batches(backbone_fn, dataset)
    features, labels, kept = [], [], []
    for batch_features, batch_labels, images in batches:
        batch = batch_features.numpy()
        features.append(batch)
        labels.append(batch_labels.numpy())
        if keep_images and sum(len(x) for x in kept) < keep_images:
            kept.append(images.numpy())
        if tracker is not None:
            tracker.update(batch, images.numpy(), batch_labels.numpy())
    if not features:
        raise ValueError("the dataset is empty: no features to extract")
    result = (np.concatenate(features).astype(np.float32), np.concatenate(labels).astype(np.int64))
    if keep_images:
        return (*result, np.concatenate(kept)[:keep_images])
    return result


@dataclasses.dataclass
class KNNResult:
    top1: float
    top5: float
    num_train: int
    num_val: int
    grid: np.ndarray | None = None  # uint8 [H, W, 3] retrieval grid, when asked for


def evaluate(
    backbone_fn: keras.Model | Callable,
    train_ds: tf.data.Dataset,
    val_ds: tf.data.Dataset,
    k: int = 200,
    t: float = 0.1,
    num_classes: int | None = None,
    grid_queries: int = 0,
    grid_neighbours: int = 8,
    class_names: Sequence[str] = (),
    strategy: tf.distribute.Strategy | None = None,
) -> KNNResult:
    """kNN accuracy of `backbone_fn` (train split = memory bank), optionally with a retrieval grid
    of the first `grid_queries` val images and their `grid_neighbours` nearest train images.

    strategy: features are extracted over its replicas and workers (see `extract_features`); the
    vote runs on each worker's default device, on the gathered features."""
    tracker = None
    if grid_queries:
        val_features, val_labels, query_images = extract_features(
            backbone_fn, val_ds, keep_images=grid_queries, strategy=strategy
        )
        tracker = _NeighbourTracker(val_features[:grid_queries], grid_neighbours)
    else:
        val_features, val_labels = extract_features(backbone_fn, val_ds, strategy=strategy)
    train_features, train_labels = extract_features(backbone_fn, train_ds, tracker=tracker, strategy=strategy)
    if num_classes is None:
        num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    scores = knn_scores(train_features, train_labels, val_features, k, t, num_classes)
    acc = accuracy(scores, val_labels)
    grid = None
    if tracker is not None:
        q = len(query_images)
        grid = retrieval_grid(
            query_images,
            val_labels[:q],
            tracker.images,
            tracker.labels,
            predicted=top_classes(scores[:q], 1)[:, 0],
            class_names=class_names,
        )
    return KNNResult(acc["top1"], acc["top5"], len(train_labels), len(val_labels), grid)


# ----------------------------------------------------------------------------------------------
# training-time monitor


class KNNMonitor(keras.callbacks.Callback):
    """Every `every_n_epochs` epochs and at `final_epoch`, kNN top-1 of `model.backbone_q` (inference mode) on
    `val_ds` with `train_ds` as memory bank, put into the epoch logs as `knn_top1` (and
    `knn_top5`); with `log_dir`, also TensorBoard scalars and the retrieval grid image.

    train_ds / val_ds: finite (images, labels) datasets with the eval transform
    (`moco_tf.data.pipelines.labelled_dataset`). Put this callback before those that read the logs
    (TensorBoard, CSVLogger, checkpointing on `knn_top1`).
    """

    def __init__(
        self,
        train_ds: tf.data.Dataset,
        val_ds: tf.data.Dataset,
        every_n_epochs: int = 1,
        log_dir: str | None = None,
        k: int = 200,
        t: float = 0.1,
        num_classes: int | None = None,
        class_names: Sequence[str] = (),
        grid_queries: int = 8,
        grid_neighbours: int = 8,
        final_epoch: int | None = None,
    ):
        super().__init__()
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.train_ds, self.val_ds = train_ds, val_ds
        self.every_n_epochs, self.log_dir = every_n_epochs, log_dir
        self.k, self.t, self.num_classes, self.class_names = k, t, num_classes, tuple(class_names)
        self.grid_queries = grid_queries if log_dir else 0
        self.grid_neighbours = grid_neighbours
        self._writer = None
        # The run's last epoch is always evaluated: "after training" must mean after the last one.
        self.final_epoch = final_epoch

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_n_epochs and epoch + 1 != self.final_epoch:
            return
        result = evaluate(
            self.model.backbone_q,
            self.train_ds,
            self.val_ds,
            self.k,
            self.t,
            self.num_classes,
            grid_queries=self.grid_queries,
            grid_neighbours=self.grid_neighbours,
            class_names=self.class_names,
        )
        if logs is not None:
            logs["knn_top1"] = result.top1
            logs["knn_top5"] = result.top5
        if self.log_dir:
            if self._writer is None:
                self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "knn"))
            # record_if(True): Keras's TensorBoard callback leaves its every-N-steps condition in force.
            with self._writer.as_default(), tf.summary.record_if(True):
                summary_scalar("knn_top1", result.top1, epoch + 1)
                summary_scalar("knn_top5", result.top5, epoch + 1)
                if result.grid is not None:
                    summary_image("knn_retrieval", result.grid, epoch + 1)
            self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
