"""The tf.data pipelines of a `moco_tf.data.sources.Source`, for pretraining and evaluation.

- `pretrain_dataset`: shuffled, repeated; each element one float32 tensor [B, 2, S, S, 3] of
  two independent views (one tensor, not a tuple: MultiWorkerMirroredStrategy + Keras `fit`
  is fragile with tuples), or with `with_ids` a dict {"views": that tensor, "ids": int32 [B]},
  each image's index in its split (-1 for TFDS, whose records carry none). Encoded files are
  cropped per file (JPEG: decode only the crop windows), then jitter/grayscale/blur run on
  whole batches. `start_step` resumes the seeded
  stream exactly for digits and folders (by arithmetic, reading no skipped file), and with a
  fresh order, not bit-exact, for TFDS: see its docstring.
- `labelled_dataset`: (images [b, S, S, 3], labels int32 [b]) for kNN and the linear protocol.
Both shard per input pipeline when given a `tf.distribute.InputContext`.
"""

from __future__ import annotations

import random

import numpy as np
import tensorflow as tf

from moco_tf.data import augment
from moco_tf.data.sources import AUTOTUNE, DataError, Source


def _check_image_size(source: Source, image_size: int) -> None:
    if not isinstance(image_size, int) or image_size < source.min_image_size:
        raise DataError(
            f"--image_size={image_size} is too small: use at least {source.min_image_size} "
            "(32 for CIFAR-size data, 224 for ImageNet)"
        )


def _local_batch(batch_size: int, input_context: tf.distribute.InputContext | None) -> int:
    if batch_size < 1:
        raise DataError(f"--batch_size={batch_size} must be at least 1")
    if input_context is None:
        return batch_size
    if batch_size % input_context.num_replicas_in_sync:
        raise DataError(
            f"--batch_size={batch_size} must be a multiple of the number of replicas, "
            f"{input_context.num_replicas_in_sync}"
        )
    return input_context.get_per_replica_batch_size(batch_size)


def _base_seed(seed: int | None, input_context: tf.distribute.InputContext | None) -> tf.Tensor:
    # Every input pipeline gets its own stream, reproducible when a seed is given.
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
    pipeline = input_context.input_pipeline_id if input_context else 0
    return tf.constant([seed, pipeline], tf.int64)


def _with_seeds(ds: tf.data.Dataset, base: tf.Tensor, salt: int, start: int = 0) -> tf.data.Dataset:
    """Zip a distinct stateless seed onto each element: fold the element's index into `base`.
    `start`: the index of the first element (a resumed stream continues the count)."""
    seeds = tf.data.Dataset.counter(start=start).map(
        lambda i: tf.random.experimental.stateless_fold_in(
            tf.random.experimental.stateless_fold_in(base, salt), i
        )
    )
    return tf.data.Dataset.zip((ds, seeds))


def _epoch_indices(num: int, input_context, base: tf.Tensor, start: int) -> tf.data.Dataset:
    """This pipeline's example indices, epoch after epoch, from element `start` of the stream.

    The pipeline's shard is every num_input_pipelines-th example (as `Dataset.shard`); epoch
    e is that shard in the order of a stateless shuffle seeded by (base, e). So any position
    is found by arithmetic: epoch start // m, offset start % m (m = shard size), and skipping
    costs one permutation of int indices, never a read.
    """
    n_shards, shard = (
        (input_context.num_input_pipelines, input_context.input_pipeline_id) if input_context else (1, 0)
    )
    local = tf.range(shard, num, n_shards, dtype=tf.int64)
    size = len(range(shard, num, n_shards))
    first_epoch, offset = divmod(int(start), size)
    perm_base = tf.random.experimental.stateless_fold_in(base, 0)  # salt 0: the order

    def epoch(e):
        order = tf.random.experimental.stateless_shuffle(
            local, seed=tf.random.experimental.stateless_fold_in(perm_base, e)
        )
        return tf.data.Dataset.from_tensor_slices(order[tf.where(e == first_epoch, offset, 0) :])

    return tf.data.Dataset.counter(start=first_epoch).flat_map(epoch)


def _record_shuffle_seed(seed: int | None, start_step: int) -> int | None:
    """The TFDS shuffle seed of a stream resumed at `start_step` (see `pretrain_dataset`)."""
    if seed is None or start_step == 0:
        return seed
    return int(np.random.SeedSequence([seed, start_step]).generate_state(1)[0] >> 1)


def _options(ds: tf.data.Dataset, input_context) -> tf.data.Dataset:
    options = tf.data.Options()
    if input_context is None:
        # Handed to strategy.experimental_distribute_dataset: shard elements, not files.
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    options.deterministic = True
    return ds.with_options(options)


def pretrain_dataset(
    source: Source,
    split: str,
    image_size: int,
    aug: str,
    global_batch_size: int,
    seed: int | None = None,
    input_context: tf.distribute.InputContext | None = None,
    start_step: int = 0,
    views: augment.ViewOptions = augment.OFFICIAL_VIEWS,
    with_ids: bool = False,
) -> tf.data.Dataset:
    """Two MoCo views per image: infinite batches float32 [local_batch, 2, S, S, 3].

    `views`: crop scale, flip and blur (default: the official recipe). `with_ids`: each batch is
    {"views": the views, "ids": int32 [local_batch]}, the index of each image in `split` (-1 for
    TFDS): what lets MoCo see when a query's own image is among the queue's negatives. The ids
    do not change the views: the same seed gives the same views with and without them.

    Shuffled anew each epoch, drop_remainder (static shapes) over the repeated stream,
    prefetched. With a seed the stream is the same on every run (per input pipeline).

    `start_step`: the stream as if `start_step` batches had already been taken from it (a
    resumed run passes the steps done). What a resume must keep from the first run: the same
    int `seed` (a run without --seed draws one and stores it), global batch size, input
    pipelines (replicas/workers), and data (split, files in the same order, image_size, aug).
    - "arrays" and "files" sources (digits, image folders): exact. Batch k of the stream from
      `start_step` = s is element for element batch s + k of the stream from 0 (same images,
      same augmentation), epoch boundaries included. Each pipeline permutes its shard anew
      every epoch from a stateless seed (seed, pipeline, epoch), and every augmentation seed
      folds in the element's (or batch's) index in the infinite stream, so the position
      s * local_batch is found by arithmetic: skipping reads no file. One exception: in
      non-strict mode a file that passes the header check but fails to decode is dropped by
      the pipeline, and a resumed stream then repeats (at most) as many elements as were
      dropped before the position; with --strict_data every file was decoded up front.
    - TFDS (records): not bit-exact. Reaching the position would mean reading every skipped
      record (up to an epoch of ImageNet); instead the resumed stream starts a new pass over
      the data with a file and buffer shuffle seeded by (seed, start_step), and its
      augmentation seeds continue from the position. So a resume replays no batch of the
      start of the data, but the interrupted epoch is not continued: until that pass ends
      some examples are seen once more and others once less.
    """
    _check_image_size(source, image_size)
    augment._config(aug)
    if not isinstance(start_step, int | np.integer) or start_step < 0:
        raise DataError(f"start_step={start_step} must be a step count >= 0")
    start_step = int(start_step)
    batch = _local_batch(global_batch_size, input_context)
    n_pipelines = input_context.num_input_pipelines if input_context else 1
    total = source.num_examples(split)
    if total < batch * n_pipelines:
        raise DataError(
            f"split {split!r} of {source.name} has {total} images, fewer than one batch "
            f"of {global_batch_size}: lower --batch_size"
        )
    base = _base_seed(seed, input_context)
    start = start_step * batch  # elements this pipeline's uninterrupted stream has handed out
    if source.kind == "tfds":
        ds = source.examples(
            split, input_context, shuffle=True, seed=_record_shuffle_seed(seed, start_step)
        ).repeat()
    else:
        data = source.splits[split][0]  # images, or paths
        indices = _epoch_indices(total, input_context, base, start)
    if source.kind == "arrays":
        # Equally sized decoded images: gather whole batches, augment whole batches.
        images = tf.constant(data)
        ds = indices.batch(batch, drop_remainder=True).map(lambda i: (tf.gather(images, i), i))
        ds = _with_seeds(ds, base, 1, start_step)

        def two_views(example, seed):
            images, ids = example
            s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
            pair = [augment.augment_batch(images, aug, image_size, s, views) for s in (s1, s2)]
            return tf.stack(pair, axis=1), tf.cast(ids, tf.int32)

        ds = ds.map(two_views, num_parallel_calls=AUTOTUNE)
    else:
        if source.kind == "files":
            paths = tf.constant(data)
            ds = indices.map(lambda i: (tf.io.read_file(tf.gather(paths, i)), i), num_parallel_calls=AUTOTUNE)
        else:  # TFDS records carry no index in the split
            ds = ds.map(lambda image, label: (image, tf.constant(-1, tf.int64)))
        # Encoded files: crop (and flip) per file, decoding only the windows of a JPEG...
        ds = _with_seeds(ds, base, 1, start)
        ds = ds.map(
            lambda example, seed: (
                augment.random_crops_encoded(example[0], image_size, 2, seed, views.crop_scale, views.flip),
                tf.cast(example[1], tf.int32),
            ),
            num_parallel_calls=AUTOTUNE,
        )
        if not source.strict:
            ds = ds.ignore_errors(log_warning=True)
        # ...then the colour ops on whole batches of views.
        ds = ds.batch(batch, drop_remainder=True)
        ds = _with_seeds(ds, base, 2, start_step)

        def color(example, seed):
            crops, ids = example
            pair = augment.augment_crops(
                tf.reshape(crops, [-1, image_size, image_size, 3]), aug, image_size, seed, views
            )
            return tf.reshape(pair, [batch, 2, image_size, image_size, 3]), ids

        ds = ds.map(color, num_parallel_calls=AUTOTUNE)
    if with_ids:
        ds = ds.map(lambda pair, ids: {"views": pair, "ids": ids})
    else:
        ds = ds.map(lambda pair, ids: pair)
    return _options(ds.prefetch(AUTOTUNE), input_context)


def labelled_dataset(
    source: Source,
    split: str,
    image_size: int,
    batch_size: int,
    train_aug: bool = False,
    input_context: tf.distribute.InputContext | None = None,
    drop_remainder: bool = False,
    repeat: bool = False,
    shuffle: bool = False,
    seed: int | None = None,
    subset: int = 0,
) -> tf.data.Dataset:
    """(images float32 [b, S, S, 3] normalised, labels int32 [b]) from a labelled split.

    `train_aug`: RandomResizedCrop(S, scale 0.08-1) + flip (the linear protocol's training
    transform); otherwise the eval transform (resize to S * 256/224, centre crop). `batch_size`
    is global: with an input context each pipeline yields its per-replica share.
    `subset`: only about N examples, evenly spaced through the split and the same every epoch
    (quick checks); a split stored class by class keeps all its classes. 0: all.
    """
    _check_image_size(source, image_size)
    if not source.num_classes:
        raise DataError(f"{source.name} has no labels: kNN and linear evaluation need class subfolders")
    batch = _local_batch(batch_size, input_context)
    base = _base_seed(seed, input_context)
    total = source.num_examples(split)
    if 0 < subset < total:
        # The first N of a folder or TFDS split sorted by class would be one or two classes.
        ds = source.examples(split, input_context).shard(total // subset, 0).take(subset)
        if shuffle:
            ds = ds.shuffle(subset, seed=seed)
    else:
        ds = source.examples(split, input_context, shuffle=shuffle, seed=seed)
    if repeat:
        ds = ds.repeat()
    ds = _with_seeds(ds, base, 3)
    encoded = source.kind != "arrays"

    def transform(example, seed):
        image, label = example
        if train_aug:
            if encoded:
                view = augment.random_crops_encoded(
                    image, image_size, 1, seed, scale=augment.LINCLS_CROP_SCALE
                )[0]
            else:
                s_crop, s_flip = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
                shape = tf.shape(image)
                window = augment.sample_crop_windows(
                    shape[0:1], shape[1:2], s_crop, scale=augment.LINCLS_CROP_SCALE
                )
                flip = tf.random.stateless_uniform([1], s_flip) < 0.5
                view = tf.round(augment.crop_and_resize_batch(image[None], window, image_size, flip))[0]
            view = augment.normalize(tf.cast(view, tf.float32) / 255.0)
        else:
            view = augment.eval_transform(augment.decode_image(image) if encoded else image, image_size)
        view.set_shape([image_size, image_size, 3])
        return view, label

    ds = ds.map(transform, num_parallel_calls=AUTOTUNE)
    if encoded and not source.strict:
        ds = ds.ignore_errors(log_warning=True)
    ds = ds.batch(batch, drop_remainder=drop_remainder)
    return _options(ds.prefetch(AUTOTUNE), input_context)
