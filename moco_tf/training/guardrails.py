"""Recipe checks for small data: settings that are valid but fit the pretraining set badly.

`recipe_warnings(config, num_examples)` is pure (no data, no devices): one line per mismatch,
each saying what to set. pretrain() prints them on stderr before the first step; they warn,
never refuse, because a run may mean to do it (a benchmark of the official recipe on a subset).

What they catch is what made a small-data recipe worse than no training: a queue that is a
large share of the images (a query's own image then sits among its negatives), too few steps an
epoch, a queue that never fills, a blur too small to change small images, flipped digits. The
recipe that had all of them, and what it did to kNN top-1: benchmarks/RESULTS.md, "Quickstart".
"""

from __future__ import annotations

from moco_tf.data import augment
from moco_tf.training.config import PretrainConfig

# A queue holding more than this share of the images makes a query's own older keys (its
# image's views from recent steps) common among its negatives.
MAX_QUEUE_SHARE = 0.25
# Fewer steps an epoch: BatchNorm and the queue see few distinct batches, and the key encoder's
# moving average (m = 0.99 or 0.999) barely moves in an epoch.
MIN_STEPS_PER_EPOCH = 10
# Data sets whose mirror images are other things (a mirrored 2 or 7 is no digit).
NO_FLIP_DATASETS = ("digits",)


def recipe_warnings(config: PretrainConfig, num_examples: int) -> list[str]:
    """One line per setting of `config` that fits a pretraining set of `num_examples` images
    badly, with the flag to change and a value that fits; empty when nothing stands out."""
    model, data, optim = config.model, config.data, config.optim
    keys_per_step = optim.batch_size * (2 if model.symmetric else 1)
    steps_per_epoch = config.runtime.steps_per_epoch or num_examples // optim.batch_size
    total_steps = config.total_steps(max(steps_per_epoch, 1))
    out = []

    share = model.queue_size / num_examples
    if share > MAX_QUEUE_SHARE:
        fits = int(MAX_QUEUE_SHARE * num_examples) // keys_per_step * keys_per_step
        advice = (
            f"set --queue_size<={fits} (a multiple of the {keys_per_step} keys per step)"
            if fits
            else f"lower --batch_size so that a queue of a few steps' keys stays under {MAX_QUEUE_SHARE:.0%}"
        )
        out.append(
            f"--queue_size={model.queue_size} holds {share:.0%} of the {num_examples} pretraining images "
            f"(more than {MAX_QUEUE_SHARE:.0%}): a query's own image often has older keys among its negatives "
            f"(logged as self_neg); {advice}"
        )
    batches = num_examples // optim.batch_size  # an epoch cut short with --steps_per_epoch is meant
    if 0 < batches < MIN_STEPS_PER_EPOCH:
        most = num_examples // MIN_STEPS_PER_EPOCH
        out.append(
            f"--batch_size={optim.batch_size} gives {batches} steps an epoch over {num_examples} images "
            f"(fewer than {MIN_STEPS_PER_EPOCH}): set --batch_size<={most} for more steps in the same time"
        )
    fill_steps = -(-model.queue_size // keys_per_step)
    if total_steps < fill_steps:
        out.append(
            f"the queue of {model.queue_size} keys takes {fill_steps} steps to fill but the run trains "
            f"{total_steps}: part of the negatives stay random vectors; lower --queue_size or train longer"
        )
    if data.aug == "v2" and data.blur and augment.blur_radius(data.image_size) <= 1:
        sigma = augment.BLUR_SIGMA[1] * data.image_size / augment.REFERENCE_SIZE
        out.append(
            f"--blur at --image_size={data.image_size} is a 3-pixel kernel of sigma at most {sigma:.2g} px "
            "(scaled from 224 px): it barely changes the views and costs time; set --noblur"
        )
    if data.flip and data.dataset in NO_FLIP_DATASETS:
        out.append(
            f"--flip on {data.dataset}: mirrored digits are other shapes (a mirrored 2 is no digit); set --noflip"
        )
    return out
