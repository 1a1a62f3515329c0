"""moco_tf.data.pipelines resume: `pretrain_dataset(..., start_step=s)` continues the seeded stream exactly
(digits, image folders; across epoch boundaries, per input pipeline) without reading the skipped
files; and data mistakes (digits + --data_dir, a truncated JPEG in strict mode)."""

import dataclasses
import io
import os
import shutil
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from moco_tf.data import pipelines, sources


def _stream(source, batch, start_step, count, seed=7, input_context=None):
    # v1 at 16 px: the cheapest augmentation; its random ops take their seeds as v2's do.
    ds = pipelines.pretrain_dataset(
        source, "train", 16, "v1", batch, seed=seed, input_context=input_context, start_step=start_step
    )
    return [b["views"].numpy() for b in ds.take(count)]


@pytest.fixture(scope="module")
def small_digits():
    """90 of the digits ("arrays" source): with batch 20 an epoch is 4.5 steps."""
    source = sources.make_source("digits")
    images, labels = source.splits["train"]
    return dataclasses.replace(source, splits={"train": (images[:90], labels[:90])})


def _photo(rng, size=40):
    """A smooth random image (a photo's statistics, not noise): upsampled 5x5 colour field."""
    small = rng.integers(0, 256, (5, 5, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.BILINEAR))


@pytest.fixture(scope="module")
def jpeg_dir(tmp_path_factory):
    """10 JPEGs in two class folders: with batch 4 an epoch is 2.5 steps."""
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for i in range(10):
        folder = root / ("a" if i < 5 else "b")
        folder.mkdir(exist_ok=True)
        Image.fromarray(_photo(rng)).save(folder / f"{i:02d}.jpg", quality=90)
    return str(root)


def test_arrays_resume_is_exact_across_epochs(small_digits):
    full = _stream(small_digits, 20, 0, 7)
    resumed = _stream(small_digits, 20, 4, 3)  # step 4 holds the end of epoch 1 and the start of epoch 2
    for step, batch in enumerate(resumed, start=4):
        assert np.array_equal(batch, full[step]), step
    # the old stream replayed the start after a resume
    assert not any(np.array_equal(full[k], full[0]) for k in range(1, 7))


def test_arrays_resume_per_input_pipeline(small_digits):
    ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1, num_replicas_in_sync=2)
    full = _stream(small_digits, 20, 0, 6, input_context=ctx)  # 10 a step of this pipeline's 45
    assert full[0].shape == (10, 2, 16, 16, 3)
    resumed = _stream(small_digits, 20, 4, 2, input_context=ctx)
    assert np.array_equal(resumed[0], full[4]) and np.array_equal(resumed[1], full[5])


def test_epoch_orders_are_permutations_of_the_shard_and_differ():
    base = tf.constant([5, 1], tf.int64)
    for n_shards, shard in ((1, 0), (3, 2)):
        ctx = tf.distribute.InputContext(num_input_pipelines=n_shards, input_pipeline_id=shard)
        mine = np.arange(shard, 50, n_shards)
        m = len(mine)
        full = np.array(list(pipelines._epoch_indices(50, ctx, base, 0).take(3 * m).as_numpy_iterator()))
        epochs = full.reshape(3, m)
        for e in epochs:
            np.testing.assert_array_equal(np.sort(e), mine)  # each epoch: the whole shard once
        assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
        for start in (1, m - 1, m, m + 5, 2 * m + 3):
            part = list(pipelines._epoch_indices(50, ctx, base, start).take(8).as_numpy_iterator())
            np.testing.assert_array_equal(part, full[start : start + 8])


def test_folder_resume_is_exact_and_reads_no_skipped_file(jpeg_dir, tmp_path):
    source = sources.make_source("folder", jpeg_dir)
    full = _stream(source, 4, 0, 6)  # 24 elements: 2.4 epochs of 10 files
    resumed = _stream(source, 4, 2, 4)  # step 2 holds the end of epoch 1 and the start of epoch 2
    for step, batch in enumerate(resumed, start=2):
        assert np.array_equal(batch, full[step]), step
    assert not np.array_equal(full[0][:, 0], full[5][:, 0])

    # A copy of the folder, read strictly (a missing file would stop the pipeline); every file
    # that the first batch at step 10**6 does not need is deleted: skipping must not open them.
    copy = tmp_path / "copy"
    shutil.copytree(jpeg_dir, copy)
    strict = sources.make_source("folder", str(copy), strict=True)
    paths = strict.splits["train"][0]
    start_step = 10**6
    needed = pipelines._epoch_indices(len(paths), None, pipelines._base_seed(7, None), start_step * 4).take(4)
    needed = {paths[i] for i in needed.as_numpy_iterator()}
    assert 1 <= len(needed) <= 4
    for path in set(paths) - needed:
        os.remove(path)
    began = time.perf_counter()
    batch = _stream(strict, 4, start_step, 1)[0]
    assert time.perf_counter() - began < 5
    assert batch.shape == (4, 2, 16, 16, 3) and np.isfinite(batch).all() and batch.std() > 0.1


def test_bad_start_step_and_record_seed():
    source = sources.make_source("digits")
    with pytest.raises(sources.DataError, match="start_step=-1"):
        pipelines.pretrain_dataset(source, "train", 16, "v2", 8, seed=0, start_step=-1)
    # TFDS sources: a resumed run reshuffles with a seed of (seed, step): a new, reproducible order
    assert pipelines.pass_seed(3, 0) == 3 and pipelines.pass_seed(None, 5) is None
    seeds = {pipelines.pass_seed(3, s) for s in (1, 2, 1000)}
    assert len(seeds) == 3 and pipelines.pass_seed(3, 2) in seeds and 3 not in seeds
    assert all(0 <= s < 2**63 for s in seeds)


# ----------------------------------------------------------------------------------------------
# answers that must be clear


def test_digits_refuses_a_data_dir(tmp_path):
    with pytest.raises(sources.DataError, match="--data_dir is not used with --dataset=digits") as err:
        sources.make_source("digits", str(tmp_path))
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)
    assert sources.make_source("digits", "").num_examples("train") == 1438  # an empty flag is no data_dir


def _write(folder, name, payload):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(payload)


def _jpeg(image, **kwargs):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", **kwargs)
    return buf.getvalue()


def test_strict_data_decodes_a_truncated_jpeg_with_an_end_marker(tmp_path):
    rng = np.random.default_rng(1)
    good = _jpeg(_photo(rng, 32), quality=75)
    root = tmp_path / "cut"
    _write(root / "a", "0.jpg", good)
    _write(root / "a", "1.jpg", _jpeg(_photo(rng, 32)))
    _write(root / "a", "2.jpg", good[: len(good) // 2] + b"\xff\xd9")  # cut, end marker re-appended
    assert sources._check_file(str(root / "a" / "2.jpg")) is None  # passes the header check...
    assert sources.make_source("folder", str(root)).num_examples("train") == 3  # ...so kept when not strict
    with pytest.raises(sources.DataError, match="2.jpg") as err:
        sources.make_source("folder", str(root), strict=True)
    assert "\n" not in str(err.value) and "--strict_data" in str(err.value)
    os.remove(root / "a" / "2.jpg")
    assert sources.make_source("folder", str(root), strict=True).num_examples("train") == 2


def test_strict_data_finds_a_grey_filled_jpeg(tmp_path):
    """A larger JPEG cut at 90% plus an end marker: TensorFlow decodes it (the missing rows grey)
    without an error; only a decode that treats libjpeg's warnings as errors finds it."""
    pytest.importorskip("simplejpeg", reason="simplejpeg (requirements.txt) makes strict JPEG checks exact")
    rng = np.random.default_rng(2)
    whole = _jpeg(_photo(rng, 160), quality=95)
    cut = whole[: int(len(whole) * 0.9)] + b"\xff\xd9"
    tf.io.decode_image(cut, channels=3)  # what the pipeline would have trained on
    assert sources._decode_problem(whole) is None
    assert "premature end" in sources._decode_problem(cut)
    root = tmp_path / "grey"
    _write(root, "whole.jpg", whole)
    _write(root, "cut.jpg", cut)
    with pytest.raises(sources.DataError, match="cut.jpg.*premature end"):
        sources.make_source("folder", str(root), strict=True)
    progressive = _jpeg(_photo(rng, 160), quality=95, progressive=True)
    assert sources._decode_problem(progressive) is None
    assert sources._decode_problem(progressive[: int(len(progressive) * 0.7)] + b"\xff\xd9") is not None
