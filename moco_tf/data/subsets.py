"""Labelled subsets for semi-supervised fine-tuning: a fraction of a train split's labels.

`label_subset(source, fraction, seed)` returns a source whose train split holds only the chosen
examples; its eval split is untouched (a different split, so the two never share an image).

- ImageNet (TFDS `imagenet2012`) at 1% or 10%: TFDS's `imagenet2012_subset/1pct` and `10pct`,
  the fixed lists of the SimCLR papers, so numbers compare with published ones. They must be
  prepared under the same data_dir (`tfds build imagenet2012_subset/1pct`).
- Anything else: class-balanced and fixed by the seed. Each class keeps
  round(fraction x its count) examples (at least one), drawn by a permutation of that class's
  indices seeded by (seed, class), so the same seed gives the same subset on every machine and
  a larger fraction keeps the smaller one's examples (the permutation's prefix).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from moco_tf.data.sources import DataError, Source, make_source

# TFDS's published ImageNet subsets (the SimCLR lists): fraction -> builder config.
IMAGENET_SUBSETS = {0.01: "imagenet2012_subset/1pct", 0.1: "imagenet2012_subset/10pct"}


def check_fraction(fraction: float) -> None:
    if not (isinstance(fraction, int | float) and 0.0 < fraction <= 1.0):
        raise DataError(f"--label_fraction must be in (0, 1], got {fraction}")


def class_balanced_indices(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices into `labels` of a class-balanced subset (see the module docstring)."""
    check_fraction(fraction)
    labels = np.asarray(labels)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        keep = max(1, int(round(fraction * len(members))))
        order = np.random.default_rng([int(seed), int(label)]).permutation(len(members))
        chosen.append(members[order[:keep]])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros([0], np.int64)


def label_subset(source: Source, fraction: float, seed: int, data_dir: str | None = None) -> Source:
    """`source` with its train split cut to `fraction` of its labels (1.0: unchanged)."""
    check_fraction(fraction)
    if fraction == 1.0:
        return source
    if not source.num_classes:
        raise DataError(f"{source.name} has no labels: fine-tuning needs class subfolders or a labelled TFDS set")
    if source.kind == "tfds" and source.name.split(":")[0] == "imagenet2012" and fraction in IMAGENET_SUBSETS:
        subset = make_source(IMAGENET_SUBSETS[fraction], data_dir)
        # The subsets have only a train split: evaluate on imagenet2012's validation split.
        return _SplitFrom(subset, source)
    split = source.train_split
    labels = _labels(source, split)
    indices = class_balanced_indices(labels, fraction, seed)
    if source.kind == "tfds":
        return _TfdsSubset(**_fields(source), indices=indices)
    data, all_labels = source.splits[split]
    splits = {**source.splits, split: (data[indices], np.asarray(all_labels)[indices])}
    return dataclasses.replace(source, splits=splits)


def _fields(source: Source) -> dict:
    return {f.name: getattr(source, f.name) for f in dataclasses.fields(Source)}


def _labels(source: Source, split: str) -> np.ndarray:
    if source.kind != "tfds":
        return np.asarray(source.splits[split][1])
    # One pass over the split's labels in its stored order (the images are never decoded).
    return np.fromiter((int(label) for _, label in source.examples(split).as_numpy_iterator()), np.int64)


@dataclasses.dataclass
class _TfdsSubset(Source):
    """A TFDS source whose train split is the examples at `indices` of its stored order."""

    indices: np.ndarray = dataclasses.field(default=None, repr=False)

    def num_examples(self, split: str) -> int:
        return len(self.indices) if split == self.train_split else super().num_examples(split)

    def examples(self, split, input_context=None, shuffle=False, seed=None) -> tf.data.Dataset:
        if split != self.train_split:
            return super().examples(split, input_context, shuffle, seed)
        mask = np.zeros([super().num_examples(split)], bool)
        mask[self.indices] = True
        keep = tf.constant(mask)
        ds = super().examples(split)  # stored order, unsharded: the indices refer to it
        ds = ds.enumerate().filter(lambda i, _: keep[i])
        ds = ds.map(lambda _, example: example)
        if input_context is not None and input_context.num_input_pipelines > 1:
            ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        if shuffle:
            ds = ds.shuffle(len(self.indices), seed=seed, reshuffle_each_iteration=True)
        return ds


class _SplitFrom(Source):
    """TFDS's ImageNet subset for training, imagenet2012's validation split for evaluation."""

    def __init__(self, subset: Source, full: Source):
        super().__init__(**{**_fields(subset), "eval_split": full.eval_split, "name": subset.name})
        self.full = full

    def num_examples(self, split: str) -> int:
        return super().num_examples(split) if split == self.train_split else self.full.num_examples(split)

    def examples(self, split, input_context=None, shuffle=False, seed=None) -> tf.data.Dataset:
        owner = super() if split == self.train_split else self.full
        return owner.examples(split, input_context, shuffle, seed)
