"""The tf.data pipelines of a `moco_tf.data.sources.Source`, for pretraining and evaluation.

- `pretrain_dataset`: shuffled, repeated batches of two views per image, each a `PretrainBatch`.
  Encoded files are cropped per file (JPEG: decode only the crop windows), then
  jitter/grayscale/blur run on whole batches (or in the train step: `color_in_step`).
  `start_step` resumes the seeded stream exactly for digits and folders (by arithmetic, reading
  no skipped file), and with a fresh order, not bit-exact, for TFDS: see its docstring.
- `labelled_dataset`: (images [b, S, S, 3], labels int32 [b]) for kNN and the linear protocol.
Both shard per input pipeline when given a `tf.distribute.InputContext`.
"""

from __future__ import annotations

import random
from typing import TypedDict

import numpy as np
import tensorflow as tf

from moco_tf.data import augment
from moco_tf.data.sources import AUTOTUNE, DataError, Source


class PretrainBatch(TypedDict):
    """The one element type of `pretrain_dataset`, whatever its arguments: a dict with these keys
    (B: the local batch, S: image_size). A dict, not a tuple: MultiWorkerMirroredStrategy + Keras
    `fit` is fragile with tuples. `MoCo.train_step` takes it as it comes.

    views: [B, 2, S, S, 3], two independent views of each image. float32, normalised; or, with
        the colour stage in the train step (`color_in_step`), uint8 crops (cropped and flipped)
        that the model's colour stage (`augment.ColorStage`, `MoCo(color_in_step=True)`) turns
        into exactly the views the host would have made.
    color_seed: int64 [2] or [2, 2], this batch's colour-stage seed (`augment.views_from_crops`);
        already used when the views are float32.
    ids: int32 [B], each image's index in its split (-1 for TFDS, whose records carry none): what
        lets MoCo see when a query's own image is among the queue's negatives.
    """

    views: tf.Tensor
    color_seed: tf.Tensor
    ids: tf.Tensor


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
    # Seeds first: zip draws its inputs in order, so an element that fails upstream (a file that
    # cannot be read) still uses up its seed and the elements after it keep theirs.
    return tf.data.Dataset.zip((seeds, ds)).map(lambda seed, element: (element, seed))


def _keep_positions(ds: tf.data.Dataset, start: int = 0, length: int | None = None) -> tf.data.Dataset:
    """(element, True) per element of `ds`, and (zeros, False) where one failed (an image that
    does not decode): one element per position however many fail.

    Why not `ignore_errors` alone: it drops the element and every later one moves up a place,
    so the stream from a step would no longer be the uninterrupted stream's (the exact resume
    of docs/reliability.md: step = input position). tf.data has no per-element try, but zip
    draws its inputs in order: a counter zipped before `ds` is used up by a failed element too,
    so after `ignore_errors` each survivor carries its position, and a scan puts a placeholder
    in each gap (a cost within the noise of cropping).
    `start`: the position of the first element; `length`: for a finite `ds`, its number of
    elements (so that failures at its very end are filled too). Element shapes must be static.
    """
    spec = ds.element_spec
    placeholder = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), spec)
    numbered = tf.data.Dataset.zip((tf.data.Dataset.counter(start), ds)).ignore_errors()
    if length is not None:  # a sentinel after the end: fills the gap before it, then is dropped
        end = tf.data.Dataset.from_tensors((tf.constant(start + length, tf.int64), placeholder))
        numbered = numbered.concatenate(end)

    def fill(expected, numbered_element):
        position, element = numbered_element
        gap = position - expected
        rows = tf.nest.map_structure(
            lambda x, zero: tf.concat([tf.repeat(zero[None], gap, axis=0), x[None]], 0), element, placeholder
        )
        return position + 1, (rows, tf.concat([tf.zeros([gap], tf.bool), [True]], 0))

    out = numbered.scan(tf.constant(start, tf.int64), fill).unbatch()
    return out.take(length) if length is not None else out


def _record_undecodable(paths: tf.Tensor, file_indices: tf.Tensor, ok: tf.Tensor, undecodable) -> tf.Tensor:
    """Hands the paths of the failed (not ok) files to `undecodable` (a Python object, so a
    py_function, run only when something failed); returns a value to hang a dependency on."""
    def record():
        failed = tf.gather(paths, tf.boolean_mask(file_indices, tf.logical_not(ok)))
        return tf.py_function(lambda p: undecodable.record(p.numpy().tolist()) or 0, [failed], tf.int32)

    return tf.cond(tf.reduce_all(ok), lambda: tf.constant(0), record)


def _is_ok(element, ok):
    return ok


def _without_ok(element, ok):
    return element


def _replace_undecodable(ds: tf.data.Dataset, file_indices: tf.data.Dataset, paths: tf.Tensor,
                         undecodable) -> tf.data.Dataset:
    """Batches ((element, ok), ...) -> element, where each failed row is replaced by the next
    decoded row of its batch (cyclically): the batch keeps its static shape and the stream its
    positions, and the replacement is a function of the data alone (deterministic, the same on a
    resumed run). The row's components (views, ids) all come from the replacement, so an id
    always names the image shown. A batch of which no row decoded keeps its zeros.
    `file_indices`: the same stream's file indices, batched alike (to name the failed files)."""

    def replace(element_ok, indices):
        element, ok = element_ok
        slots = tf.range(tf.shape(ok)[0])
        good = tf.cast(tf.where(ok)[:, 0], tf.int32)

        def next_good():
            return tf.where(ok, slots, tf.gather(good, tf.searchsorted(good, slots) % tf.size(good)))

        rows = tf.cond(tf.size(good) > 0, next_good, lambda: slots)
        with tf.control_dependencies([_record_undecodable(paths, indices, ok, undecodable)]):
            rows = tf.identity(rows)
        return tf.nest.map_structure(lambda x: tf.gather(x, rows), element)

    return tf.data.Dataset.zip((ds, file_indices)).map(replace)


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


def pass_seed(seed: int | None, k: int) -> int | None:
    """A shuffle seed made of (seed, k): the TFDS shuffle seed of a stream resumed at step k (see
    `pretrain_dataset`), the shuffle seed of pass k of a labelled split (`labelled_dataset`'s
    epoch, the linear protocol's precomputed features). seed itself for k = 0; None stays None."""
    if seed is None or k == 0:
        return seed
    return int(np.random.SeedSequence([seed, k]).generate_state(1)[0] >> 1)




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
    color_in_step: bool = False,
) -> tf.data.Dataset:
    """Two MoCo views per image: infinite `PretrainBatch`es of the local batch.

    `views`: crop scale, flip and blur (default: the official recipe). `color_in_step`: the host
    only decodes, crops and flips, and the batch's views are the uint8 crops, which the train step
    colours (`MoCo(color_in_step=True)`) with the batch's colour seed: the same draws, so the same
    views, and a quarter of the bytes cross to the device.

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
      s * local_batch is found by arithmetic: skipping reads no file. A file that does not
      decode (or read) is replaced by the next decoded image of its batch and recorded in
      `source.undecodable`, so it moves no later element (`_keep_positions`).
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
            split, input_context, shuffle=True, seed=pass_seed(seed, start_step)
        ).repeat()
    else:
        data = source.splits[split][0]  # images, or paths
        indices = _epoch_indices(total, input_context, base, start)
    if source.kind == "arrays":
        # Equally sized decoded images: gather whole batches, augment whole batches.
        images = tf.constant(data)
        ds = indices.batch(batch, drop_remainder=True).map(lambda i: (tf.gather(images, i), i))
        ds = _with_seeds(ds, base, 1, start_step)

        def crop_pairs(example, seed):
            images, ids = example
            s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
            crops, color_seeds = zip(*(augment.crop_batch(images, image_size, s, views) for s in (s1, s2)), strict=True)
            return tf.stack(crops, axis=1), tf.stack(color_seeds), tf.cast(ids, tf.int32)

        ds = ds.map(crop_pairs, num_parallel_calls=AUTOTUNE)
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
        if source.kind == "files":
            # A file that does not decode (folders are only listed at start, see sources.py)
            # is replaced by another image of its batch: static shapes, positions kept.
            ds = _keep_positions(ds, start).batch(batch, drop_remainder=True)
            ds = _replace_undecodable(ds, indices.batch(batch, drop_remainder=True), paths, source.undecodable)
        else:  # TFDS records, not resumed exactly anyway (see the docstring)
            ds = ds.ignore_errors(log_warning=True).batch(batch, drop_remainder=True)
        # ...then the colour ops on whole batches of views (below, or in the train step).
        ds = _with_seeds(ds, base, 2, start_step).map(lambda example, seed: (example[0], seed, example[1]))

    def element(crops, color_seed, ids) -> PretrainBatch:
        # Coloured here on the host, unless the train step colours them (MoCo(color_in_step=True)).
        pairs = crops if color_in_step else augment.views_from_crops(crops, color_seed, aug, image_size, views.blur)
        return PretrainBatch(views=pairs, color_seed=color_seed, ids=ids)

    ds = ds.map(element, num_parallel_calls=AUTOTUNE)
    return _options(ds.prefetch(AUTOTUNE), input_context)


def _labelled_order(
    total: int, input_context, subset: int, shuffle: bool, repeat: bool, base: tf.Tensor, first_epoch: int = 0
) -> tuple[tf.data.Dataset, int | None]:
    """The file indices `labelled_dataset` reads, and their number (None: repeated forever).

    This pipeline's shard (every num_input_pipelines-th), thinned to `subset` evenly spaced
    ones; shuffled, if asked, by a stateless permutation per epoch seeded by (`base`, epoch),
    epochs counted from `first_epoch`."""
    n_shards, shard = (
        (input_context.num_input_pipelines, input_context.input_pipeline_id) if input_context else (1, 0)
    )
    local = np.arange(shard, total, n_shards, dtype=np.int64)
    if 0 < subset < total:
        # The first N of a folder sorted by class would be one or two classes.
        local = local[:: total // subset][:subset]
    local = tf.constant(local)
    perm_base = tf.random.experimental.stateless_fold_in(base, 4)  # salt 4: the labelled order

    def epoch(e):
        if not shuffle:
            return tf.data.Dataset.from_tensor_slices(local)
        seed = tf.random.experimental.stateless_fold_in(perm_base, e)
        return tf.data.Dataset.from_tensor_slices(tf.random.experimental.stateless_shuffle(local, seed=seed))

    epochs = tf.data.Dataset.counter(first_epoch) if repeat else tf.data.Dataset.range(first_epoch, first_epoch + 1)
    return epochs.flat_map(epoch), None if repeat else int(local.shape[0])


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
    epoch: int = 0,
) -> tf.data.Dataset:
    """(images float32 [b, S, S, 3] normalised, labels int32 [b]) from a labelled split.

    `train_aug`: RandomResizedCrop(S, scale 0.08-1) + flip (the linear protocol's training
    transform); otherwise the eval transform (resize to S * 256/224, centre crop). `batch_size`
    is global: with an input context each pipeline yields its per-replica share.
    `subset`: only about N examples, evenly spaced through the split and the same every epoch
    (quick checks); a split stored class by class keeps all its classes. 0: all.
    A file of a folder that does not decode is left out (an evaluation needs no fixed
    positions, and a replacement would count an image twice) and recorded in
    `source.undecodable`, which names it (log and summaries).
    `epoch`: which pass over the split this is. Its order (with `shuffle`) and augmentation are
    functions of (seed, epoch) alone, so a run that builds each epoch's pass anew (the linear
    protocol, fine-tuning) sees a new order and new crops every epoch, and a resumed run gets
    exactly the passes an uninterrupted one would (a TFDS split: the same shuffle seeds, exact as
    far as TFDS's own reading order is).
    """
    _check_image_size(source, image_size)
    if not isinstance(epoch, int | np.integer) or epoch < 0:
        raise DataError(f"epoch={epoch} must be a pass count >= 0")
    epoch = int(epoch)
    if not source.num_classes:
        raise DataError(f"{source.name} has no labels: kNN and linear evaluation need class subfolders")
    batch = _local_batch(batch_size, input_context)
    base = _base_seed(seed, input_context)
    total = source.num_examples(split)
    files = source.kind == "files"
    if files:
        # An order of file indices that is a pure function of the seed: read a second time
        # beside the decoded stream, it names the files that failed to decode.
        order, length = _labelled_order(total, input_context, subset, shuffle, repeat, base, epoch)
        paths, labels = (tf.constant(x) for x in source.splits[split])
        ds = order.map(
            lambda i: (tf.io.read_file(tf.gather(paths, i)), tf.gather(labels, i)), num_parallel_calls=AUTOTUNE
        )
    elif 0 < subset < total:
        # The first N of a folder or TFDS split sorted by class would be one or two classes.
        ds = source.examples(split, input_context).shard(total // subset, 0).take(subset)
        if shuffle:
            ds = ds.shuffle(subset, seed=pass_seed(seed, epoch))
    else:
        ds = source.examples(split, input_context, shuffle=shuffle, seed=pass_seed(seed, epoch))
    if repeat and not files:
        ds = ds.repeat()
    # Augmentation seeds fold in the element's index in the stream of passes: pass `epoch` starts
    # after `epoch` whole passes (an upper bound of a shard's size: distinct seeds either way).
    ds = _with_seeds(ds, base, 3, start=epoch * total)
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
    if files:
        ds = tf.data.Dataset.zip((_keep_positions(ds, 0, length), order))

        def record(element_ok, i):
            element, ok = element_ok
            with tf.control_dependencies([_record_undecodable(paths, i[None], ok[None], source.undecodable)]):
                return tf.nest.map_structure(tf.identity, element), tf.identity(ok)

        ds = ds.map(record).filter(_is_ok).map(_without_ok)
    elif encoded and not source.strict:
        ds = ds.ignore_errors(log_warning=True)
    ds = ds.batch(batch, drop_remainder=drop_remainder)
    return _options(ds.prefetch(AUTOTUNE), input_context)
