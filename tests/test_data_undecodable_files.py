"""An image folder is only listed at start; files that do not decode are met by
the pipelines, which keep positions (pretraining: replaced by another image of the batch; kNN /
linear: left out), name them and count them (a summary line, a TensorBoard scalar)."""

import builtins
import glob
import io
import logging
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import moco_tf
from moco_tf.data import pipelines, sources
from moco_tf.models.backbones import BackboneSpec
from moco_tf.training import data_health
from moco_tf.training.config import DataConfig, ModelConfig, OptimConfig, PretrainConfig, RuntimeConfig


def _jpeg(rng, side=24) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def broken_dir(tmp_path):
    """Two classes of 6 JPEGs; a/3.jpg cut in half (no end marker), b/2.jpg a text file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "broken"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            (root / cls / f"{i}.jpg").write_bytes(_jpeg(rng))
    good = (root / "a" / "0.jpg").read_bytes()
    (root / "a" / "3.jpg").write_bytes(good[: len(good) // 2])
    (root / "b" / "2.jpg").write_text("not an image")
    return str(root)


BROKEN = {"a/3.jpg", "b/2.jpg"}


def _names(paths, root):
    return {os.path.relpath(p, root) for p in paths}


def test_folder_source_opens_no_file(broken_dir, monkeypatch):
    """Listing only: no file is opened (nor stat-ed one by one through gfile) by make_source."""
    opened = []
    real_open, real_gfile = builtins.open, tf.io.gfile.GFile

    def spy_open(path, *args, **kwargs):
        if str(path).startswith(broken_dir):
            opened.append(str(path))
        return real_open(path, *args, **kwargs)

    def spy_gfile(path, *args, **kwargs):
        opened.append(str(path))
        return real_gfile(path, *args, **kwargs)

    def spy_isdir(path):
        if str(path).endswith(".jpg"):
            opened.append(f"isdir {path}")
        return real_isdir(path)

    real_isdir = tf.io.gfile.isdir
    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(tf.io.gfile, "GFile", spy_gfile)
    monkeypatch.setattr(tf.io.gfile, "isdir", spy_isdir)
    source = sources.make_source("folder", broken_dir)
    assert opened == []
    assert source.num_examples("train") == 12 and source.class_names == ("a", "b")  # broken ones listed too
    assert len(source.undecodable) == 0


def test_pretrain_stream_replaces_broken_files_and_keeps_positions(broken_dir):
    source = sources.make_source("folder", broken_dir)
    paths = list(source.splits["train"][0])
    full = list(pipelines.pretrain_dataset(source, "train", 16, "v2", 4, seed=1).take(6))
    assert _names(source.undecodable.paths, broken_dir) == BROKEN
    assert "2 image file(s)" in source.undecodable.summary() and "\n" not in source.undecodable.summary()
    # Exact resume: from step 2 the stream is the uninterrupted one's, element for element,
    # although two files of every epoch (3 steps of 4) failed before that position.
    resumed = pipelines.pretrain_dataset(source, "train", 16, "v2", 4, seed=1, start_step=2)
    resumed = list(resumed.take(4))
    for step, batch in enumerate(resumed, start=2):
        np.testing.assert_array_equal(batch["views"], full[step]["views"])
        np.testing.assert_array_equal(batch["ids"], full[step]["ids"])
    # Every batch is full and finite; no broken file's id is ever shown, and a replaced slot
    # repeats another image of its batch (the epoch of 12 holds 10 distinct good images).
    broken_ids = {paths.index(os.path.join(broken_dir, b)) for b in BROKEN}
    ids = np.concatenate([b["ids"].numpy() for b in full[:3]])  # epoch 0: steps 0-2
    assert not broken_ids & set(ids) and len(set(ids)) == 10
    assert all(b["views"].shape == (4, 2, 16, 16, 3) and np.isfinite(b["views"]).all() for b in full)


def test_labelled_dataset_leaves_out_and_names_broken_files(broken_dir):
    source = sources.make_source("folder", broken_dir)
    labels = np.concatenate([y for _, y in pipelines.labelled_dataset(source, "train", 16, 4)])
    np.testing.assert_array_equal(labels, [0] * 5 + [1] * 5)  # 12 listed, 10 decode
    assert _names(source.undecodable.paths, broken_dir) == BROKEN
    # the linear protocol's stream: shuffled and repeated, still static batches
    ds = pipelines.labelled_dataset(source, "train", 16, 4, train_aug=True, drop_remainder=True, repeat=True,
                                    shuffle=True, seed=3)
    batches = [y.numpy() for _, y in ds.take(5)]  # 20 = two epochs of 10
    assert all(len(y) == 4 for y in batches) and sorted(np.concatenate(batches)) == [0] * 10 + [1] * 10


def test_strict_data_refuses_the_first_broken_file(broken_dir):
    with pytest.raises(sources.DataError, match="3.jpg.*--strict_data") as err:
        sources.make_source("folder", broken_dir, strict=True)
    assert "\n" not in str(err.value)


def test_report_callback_prints_once_per_growth_and_logs_the_count(tmp_path):
    undecodable = sources.UndecodableFiles()
    lines = []
    report = data_health.UndecodableFilesReport(undecodable, str(tmp_path), lines.append)
    report.on_epoch_end(0)
    undecodable.record([b"/d/a.jpg", "/d/b.jpg", "/d/a.jpg"])
    report.on_epoch_end(1)
    report.on_epoch_end(2)
    report.on_train_end()
    assert lines == ["2 image file(s) could not be decoded and were skipped (replaced by another image of their "
                     "batch in pretraining): /d/a.jpg, /d/b.jpg"]
    assert undecodable.occurrences == 3
    assert _scalars(str(tmp_path)) == [0.0, 2.0, 2.0]


def _scalars(log_dir):
    values = []
    for path in sorted(glob.glob(os.path.join(log_dir, "data", "events.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            values += [float(tf.make_ndarray(v.tensor)) for v in event.summary.value if v.tag == data_health.SCALAR]
    return values


@pytest.mark.slow  # a whole (tiny) run: ~15 s alone, 40 s on a loaded 2-core machine
def test_a_run_on_broken_files_trains_and_reports_them(broken_dir, tmp_path, caplog):
    model_dir = str(tmp_path / "run")
    config = PretrainConfig(
        model=ModelConfig(BackboneSpec("resnet18", width=8, cifar_stem=True), dim=16, queue_size=16,
                          moco_momentum=0.99, temperature=0.2, mlp=True, bn_groups=2),
        data=DataConfig(dataset="folder", data_dir=broken_dir, image_size=16, aug="v2"),
        optim=OptimConfig(epochs=1, batch_size=4, lr=0.06),
        runtime=RuntimeConfig(seed=1, model_dir=model_dir, knn_every=0, checkpoint_every=0),
    )
    caplog.set_level(logging.INFO, logger="moco_tf")  # the summary is an INFO record (moco_tf.reporting)
    result = moco_tf.pretrain(config, progress="none")
    assert int(result.model.optimizer.iterations.numpy()) == 3 and np.isfinite(result.history["loss"]).all()
    lines = [r.getMessage() for r in caplog.records if "could not be decoded" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("2 image file(s)")
    assert all(os.path.join(broken_dir, b) in lines[0] for b in BROKEN)
    assert _scalars(os.path.join(model_dir, "logs"))[-1] == 2.0
