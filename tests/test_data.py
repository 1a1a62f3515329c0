"""moco_tf.data: sources (digits, image folders incl. the real CIFAR-10 JPEGs, TFDS), their two-view
and labelled pipelines, sharding, seeds, and the one-line DataError for every user mistake."""

import logging
import os
import shutil
import tarfile
import time

import numpy as np
import pytest
import tensorflow as tf

from moco_tf.data import pipelines, sources

CLASSES = ("cat", "dog")
PER_CLASS = {"train": 20, "test": 8}


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory, cifar10_tar):
    """A small subset of the real CIFAR-10 JPEG folders: 2 classes, 20 train + 8 test each.
    Skipped (failed in CI) without the data: see `cifar10_tar` in conftest.py."""
    root = tmp_path_factory.mktemp("cifar")
    with tarfile.open(cifar10_tar) as tar:
        members = []
        for m in tar:
            parts = m.name.split("/")
            if m.isfile() and parts[1] in CLASSES and int(parts[2][:-4]) < PER_CLASS[parts[0]]:
                members.append(m)
        tar.extractall(root, members=members, filter="data")
    return str(root)


# ----------------------------------------------------------------------------------------------
# digits


def test_digits_source_and_pipelines():
    source = sources.make_source("digits")
    assert (source.num_classes, source.pretrain_split, source.eval_split) == (10, "train", "test")
    assert source.num_examples("train") == 1438 and source.num_examples("test") == 359
    train_images, train_labels = source.splits["train"]
    assert train_images.shape == (1438, 32, 32, 3) and train_images.dtype == np.uint8
    assert set(np.unique(train_labels)) == set(range(10))
    # real digits: dark background, bright strokes, gray (R = G = B)
    assert train_images[:, 0, 0].max() == 0 and train_images.max() == 255
    np.testing.assert_array_equal(train_images[..., 0], train_images[..., 2])

    batch = next(iter(pipelines.pretrain_dataset(source, "train", 32, "v2", 16, seed=0)))
    assert set(batch) == set(pipelines.PretrainBatch.__annotations__)  # the one batch type
    views = batch["views"]
    assert views.shape == (16, 2, 32, 32, 3) and views.dtype == tf.float32
    assert batch["ids"].shape == (16,) and batch["ids"].dtype == tf.int32
    assert np.abs(views[:, 0] - views[:, 1]).max(axis=(1, 2, 3)).min() > 0.1  # independent views

    images, labels = next(iter(pipelines.labelled_dataset(source, "test", 32, 359)))
    assert images.shape == (359, 32, 32, 3) and labels.dtype == tf.int32
    np.testing.assert_array_equal(labels, source.splits["test"][1])


# ----------------------------------------------------------------------------------------------
# image folders


def test_cifar_folder_source(cifar_dir):
    source = sources.make_source("folder", cifar_dir)
    assert source.num_classes == 2 and source.class_names == CLASSES
    assert (source.train_split, source.eval_split) == ("train", "test")
    assert source.num_examples("train") == 40 and source.num_examples("test") == 16
    assert len(source.undecodable) == 0

    ds = pipelines.pretrain_dataset(source, "train", 32, "v2", 8, seed=1)
    assert ds.element_spec["views"].shape == (8, 2, 32, 32, 3)  # static: drop_remainder
    batches = [b["views"].numpy() for b in ds.take(6)]  # 48 > 40 images: repeats into the next epoch
    assert all(b.shape == (8, 2, 32, 32, 3) for b in batches)
    again = [b["views"].numpy() for b in pipelines.pretrain_dataset(source, "train", 32, "v2", 8, seed=1).take(2)]
    other = next(iter(pipelines.pretrain_dataset(source, "train", 32, "v2", 8, seed=2)))["views"].numpy()
    np.testing.assert_array_equal(batches[0], again[0])
    np.testing.assert_array_equal(batches[1], again[1])
    assert np.abs(batches[0] - other).max() > 0.5

    images, labels = zip(*pipelines.labelled_dataset(source, "test", 32, 5), strict=True)
    labels = np.concatenate(labels)
    assert [len(x) for x in images] == [5, 5, 5, 1]
    np.testing.assert_array_equal(labels, [0] * 8 + [1] * 8)  # cat, dog in sorted class order
    # eval transform of a 32x32 image at 32: resize to 37, centre crop 32 -> a real photo's stats
    first = images[0].numpy()
    assert first.shape == (5, 32, 32, 3) and -2.2 < first.min() and first.max() < 2.7
    assert first.std() > 0.3


def test_labelled_subset_is_evenly_spaced_and_fixed(cifar_dir):
    """subset=N: N examples spread over the split (both classes of a class-sorted folder, not the
    first N = all cats), the same ones every epoch even when shuffled."""
    source = sources.make_source("folder", cifar_dir)
    labels = np.concatenate([y for _, y in pipelines.labelled_dataset(source, "test", 32, 4, subset=4)])
    np.testing.assert_array_equal(labels, [0, 0, 1, 1])  # test: 8 cats then 8 dogs, every 4th
    ds = pipelines.labelled_dataset(source, "train", 32, 8, shuffle=True, seed=2, subset=10, repeat=True)
    epochs = [np.concatenate([x.numpy().reshape(8, -1)[:, :4] for x, _ in ds.take(5)])[i:i + 10] for i in (0, 10, 20)]
    rows = [sorted(map(tuple, e.round(4))) for e in epochs]
    assert rows[0] == rows[1] == rows[2]  # the same 10 images each epoch
    assert not np.array_equal(epochs[0], epochs[1])  # in a new order
    assert sum(len(y) for _, y in pipelines.labelled_dataset(source, "train", 32, 8, subset=100)) == 40  # >= all


def test_labelled_train_aug_and_drop_remainder(cifar_dir):
    source = sources.make_source("folder", cifar_dir)
    ds = pipelines.labelled_dataset(
        source, "train", 24, 16, train_aug=True, drop_remainder=True, repeat=True, shuffle=True, seed=3
    )
    assert ds.element_spec[0].shape == (16, 24, 24, 3)
    (a, la), (b, lb) = ds.take(2)
    assert set(la.numpy()) | set(lb.numpy()) <= {0, 1}
    assert np.abs(a - b).max() > 0.5
    # same seed, same stream
    (a2, la2), _ = pipelines.labelled_dataset(
        source, "train", 24, 16, train_aug=True, drop_remainder=True, repeat=True, shuffle=True, seed=3
    ).take(2)
    np.testing.assert_array_equal(a, a2)
    np.testing.assert_array_equal(la, la2)


def test_sharding_with_input_context(cifar_dir):
    source = sources.make_source("folder", cifar_dir)
    labels = []
    for pipeline in range(2):
        ctx = tf.distribute.InputContext(
            num_input_pipelines=2, input_pipeline_id=pipeline, num_replicas_in_sync=2
        )
        views = next(iter(pipelines.pretrain_dataset(source, "train", 16, "v1", 8, seed=0, input_context=ctx)))["views"]
        assert views.shape == (4, 2, 16, 16, 3)  # per-replica share of the global batch
        images = [x.numpy() for x, _ in pipelines.labelled_dataset(source, "test", 16, 16, input_context=ctx)]
        labels.append(
            np.concatenate(
                [y.numpy() for _, y in pipelines.labelled_dataset(source, "test", 16, 4, input_context=ctx)]
            )
        )
        assert sum(len(x) for x in images) == 8
    # the two shards split the 16 test images between them, without overlap
    assert len(labels[0]) == len(labels[1]) == 8
    np.testing.assert_array_equal(np.sort(np.concatenate(labels)), [0] * 8 + [1] * 8)


@pytest.fixture
def messy_dir(cifar_dir, tmp_path):
    """Class folders with nested subfolders, PNG/BMP/GIF files, and three broken files."""
    root = tmp_path / "messy"
    src = os.path.join(cifar_dir, "train")
    for cls in CLASSES:
        (root / cls / "nested").mkdir(parents=True)
        for name in sorted(os.listdir(os.path.join(src, cls)))[:4]:
            shutil.copy(os.path.join(src, cls, name), root / cls / name)
    from PIL import Image

    photo = Image.open(os.path.join(src, "cat", "0000.jpg"))
    photo.save(root / "cat" / "nested" / "deep.png")
    photo.save(root / "dog" / "x.bmp")
    photo.save(root / "dog" / "y.GIF")
    (root / "cat" / "a_empty.jpg").write_bytes(b"")
    (root / "cat" / "nested" / "notes.jpg").write_text("not an image")
    jpeg = (root / "dog" / sorted(os.listdir(root / "dog"))[0]).read_bytes()
    (root / "dog" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "dog" / "readme.txt").write_text("ignored: not an image extension")
    # JPEG start and end markers, nothing decodable between them
    (root / "dog" / "z_garbage.jpg").write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 4 + b"\xff\xd9")
    return str(root)


def test_folder_with_corrupt_files_lists_them_then_skips_and_names_them(messy_dir, caplog):
    """A folder is only listed: broken files with an image extension are found by the pipelines,
    left out of the labelled stream, replaced in the pretraining stream, and named once each."""
    source = sources.make_source("folder", messy_dir)
    # 4 JPEG + nested PNG + empty + text cats, 4 JPEG + BMP + GIF + truncated + garbage dogs; no val split
    assert source.num_examples("train") == 15 and source.eval_split is None
    assert list(source.splits["train"][1]) == [0] * 7 + [1] * 8
    with caplog.at_level(logging.WARNING, logger="moco_tf.data.sources"):
        batches = list(pipelines.labelled_dataset(source, "train", 32, 15))
    assert len(batches) == 1 and batches[0][0].shape == (11, 32, 32, 3)
    np.testing.assert_array_equal(batches[0][1], [0] * 5 + [1] * 6)
    broken = {"a_empty.jpg", "notes.jpg", "truncated.jpg", "z_garbage.jpg"}
    assert {os.path.basename(p) for p in source.undecodable.paths} == broken
    warnings = [r.getMessage() for r in caplog.records if r.name == "moco_tf.data.sources"]
    assert len(warnings) == 4 and all("cannot decode image" in w for w in warnings)
    summary = source.undecodable.summary()
    assert summary.startswith("4 image file(s) could not be decoded") and "\n" not in summary
    views = next(iter(pipelines.pretrain_dataset(source, "train", 32, "v2", 15, seed=0)))["views"]
    assert views.shape == (15, 2, 32, 32, 3) and np.isfinite(views.numpy()).all()
    assert len(source.undecodable) == 4 and source.undecodable.occurrences >= 8


def test_folder_strict_names_the_first_bad_file(messy_dir):
    with pytest.raises(sources.DataError) as err:
        sources.make_source("folder", messy_dir, strict=True)
    message = str(err.value)
    assert "a_empty.jpg" in message and "empty file" in message and "\n" not in message


def test_unlabelled_folder(cifar_dir, tmp_path):
    for name in sorted(os.listdir(os.path.join(cifar_dir, "train", "cat")))[:6]:
        shutil.copy(os.path.join(cifar_dir, "train", "cat", name), tmp_path / name)
    source = sources.make_source("folder", str(tmp_path))
    assert source.num_classes is None and source.num_examples("train") == 6
    batch = next(iter(pipelines.pretrain_dataset(source, "train", 16, "v2", 4, seed=0)))
    assert batch["views"].shape == (4, 2, 16, 16, 3)
    with pytest.raises(sources.DataError, match="no labels"):
        pipelines.labelled_dataset(source, "train", 16, 4)


# ----------------------------------------------------------------------------------------------
# user mistakes: one line each, fast


def _one_line_error(fn, *args, match, **kwargs):
    start = time.perf_counter()
    with pytest.raises(sources.DataError, match=match) as err:
        fn(*args, **kwargs)
    assert "\n" not in str(err.value)
    assert time.perf_counter() - start < 10  # no download retries
    return str(err.value)


def test_data_errors(tmp_path, cifar_dir):
    _one_line_error(sources.make_source, "folder", None, match="needs --data_dir")
    _one_line_error(sources.make_source, "folder", str(tmp_path / "missing"), match="not a folder")
    (tmp_path / "empty" / "some_class").mkdir(parents=True)
    _one_line_error(sources.make_source, "folder", str(tmp_path / "empty"), match="no readable images")
    _one_line_error(sources.make_source, "no_such_dataset_xyz", match="unknown dataset")
    msg = _one_line_error(sources.make_source, "cifar10", str(tmp_path / "tfds"), match="not prepared")
    assert "tfds build cifar10" in msg
    msg = _one_line_error(sources.make_source, "imagenet2012", str(tmp_path / "tfds"), match="not prepared")
    assert "manual" in msg
    source = sources.make_source("folder", cifar_dir)
    _one_line_error(pipelines.pretrain_dataset, source, "train", 8, "v2", 8, match="too small")
    _one_line_error(pipelines.pretrain_dataset, source, "train", 32, "v2", 64, match="fewer than one batch")
    _one_line_error(pipelines.pretrain_dataset, source, "nope", 32, "v2", 8, match="no split 'nope'")
    _one_line_error(pipelines.labelled_dataset, source, "test", 4, 8, match="too small")


# ----------------------------------------------------------------------------------------------
# TFDS, prepared offline from a tiny in-test builder


def test_tfds_source(tmp_path):
    import tensorflow_datasets as tfds

    class MocoTinyImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(None, None, 3)),
                        "label": tfds.features.ClassLabel(num_classes=3),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(30, 0), "test": self._generate_examples(9, 1)}

        def _generate_examples(self, n, seed):
            rng = np.random.default_rng(seed)
            for i in range(n):
                h, w = rng.integers(20, 60, 2)
                yield i, {"image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "label": i % 3}

    MocoTinyImages(data_dir=str(tmp_path)).download_and_prepare()
    source = sources.make_source("moco_tiny_images", str(tmp_path))
    assert (source.num_classes, source.pretrain_split, source.eval_split) == (3, "train", "test")
    assert source.num_examples("train") == 30
    views = next(iter(pipelines.pretrain_dataset(source, "train", 24, "v2", 8, seed=0)))["views"]
    assert views.shape == (8, 2, 24, 24, 3)
    labels = np.concatenate([y for _, y in pipelines.labelled_dataset(source, "test", 24, 4)])
    np.testing.assert_array_equal(np.sort(labels), np.sort(np.arange(9) % 3))
