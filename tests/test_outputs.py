"""The output rule (moco_tf.outputs), torn run locks, foreign config files, results files
and symbolic-link loops in image folders: the parts the command-line harness
(tests/test_cli_hostile_inputs.py) cannot show from outside, such as atomicity and take-overs."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from moco_tf import outputs
from moco_tf.training import runlock


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_our_png_is_recognised_by_content_and_still_a_valid_image(tmp_path):
    ours, theirs = str(tmp_path / "ours.png"), str(tmp_path / "theirs.png")
    outputs.write_png(ours, _png())
    open(theirs, "wb").write(_png())
    assert outputs.is_ours(ours, "png") and not outputs.is_ours(theirs, "png")
    assert np.array_equal(np.asarray(Image.open(ours)), np.asarray(Image.open(theirs)))
    # The name decides nothing: our bytes under another name are ours, a user's PNG named like ours is not.
    os.rename(ours, str(tmp_path / "notes.txt"))
    assert outputs.is_ours(str(tmp_path / "notes.txt"), "png")
    outputs.check_output(str(tmp_path / "notes.txt"), "--out", "png")
    with pytest.raises(outputs.OutputError, match="was not written by moco_tf"):
        outputs.check_output(theirs, "--out", "png")
    assert open(theirs, "rb").read() == _png()


def test_a_write_that_fails_halfway_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = str(tmp_path / "r.json")
    outputs.write_json(path, {"top1": 1.0}, "lincls_final")
    before = open(path, "rb").read()

    def fail(fd):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk gone"):
        outputs.write_json(path, {"top1": 2.0}, "lincls_final")
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["r.json"]


def test_results_files_read_back_and_garbled_or_foreign_ones_are_named(tmp_path):
    from moco_tf.evaluation import linear

    path = str(tmp_path / linear.RESULTS_FILE)
    linear.write_json(path, [{"epoch": 1, "val_top1": 50.0}])
    assert json.load(open(path))["format"] == "moco_tf.lincls_results"
    assert linear.read_results_file(path) == [{"epoch": 1, "val_top1": 50.0}]
    unmarked = '[{"epoch": 1}]'
    for garbled in (unmarked, '[{"epoch": 1, ', '{"accuracy": 1}', "\0\0\0", '{"format": "moco_tf.finetune_results"}'):
        open(path, "w").write(garbled)
        with pytest.raises(outputs.OutputError, match=f"{path} is not a moco_tf lincls_results file"):
            linear.read_results_file(path)


def test_a_marked_file_of_another_kind_is_not_ours(tmp_path):
    from moco_tf.evaluation import linear

    path = str(tmp_path / "lincls_final.json")
    linear.write_json(str(tmp_path / "lincls_results.json"), [{"epoch": 1}])
    os.replace(tmp_path / "lincls_results.json", path)  # a results file where the final one goes
    with pytest.raises(outputs.OutputError, match="lincls_final.json"):
        outputs.check_output(path, "the results file", "lincls_final")
    linear.write_json(path, {"top1": 1.0})
    outputs.check_output(path, "the results file", "lincls_final")  # its own kind: may be replaced


def test_bookkeeping_of_a_run_is_never_an_output(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    for path in (run / "config.json", run / "run.lock", run / "checkpoints" / "x.png"):
        with pytest.raises(outputs.OutputError, match="pick another path"):
            outputs.check_output(str(path), "--retrieval_grid", "png")
    with pytest.raises(outputs.OutputError, match="pick another path"):
        outputs.check_output_folder(str(run / "checkpoints" / "export"), "--export_dir")
    fresh = tmp_path / "fresh"  # a run folder of this command, not yet written
    fresh.mkdir()
    with pytest.raises(outputs.OutputError, match="bookkeeping"):
        outputs.check_output(str(fresh / "config.json"), "--out", "json", protected=[str(fresh)])
    outputs.check_output(str(fresh / "grid.png"), "--out", "png", protected=[str(fresh)])


@pytest.mark.parametrize("content", [b"", b"\0" * 64, b'{"pid": 12', b'{"pid": 1234, "host": "a"\0\0\0'])
def test_a_torn_lock_in_a_run_is_taken_over_with_a_note(tmp_path, content):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / runlock.LOCK_FILE).write_bytes(content)
    lock = runlock.RunLock(str(tmp_path)).acquire()
    try:
        assert "took over a torn run.lock" in runlock.describe_previous(lock)
        assert json.loads((tmp_path / runlock.LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_a_torn_lock_outside_a_run_and_a_live_lock_stay_refused(tmp_path):
    (tmp_path / runlock.LOCK_FILE).write_bytes(b"\0" * 64)  # no run here: may be anybody's file
    with pytest.raises(runlock.RunLockedError, match="is not a moco_tf run lock"):
        runlock.RunLock(str(tmp_path)).acquire()
    assert (tmp_path / runlock.LOCK_FILE).read_bytes() == b"\0" * 64
    live = tmp_path / "live"
    live.mkdir()
    holder = runlock.RunLock(str(live)).acquire()
    try:
        with pytest.raises(runlock.RunLockedError, match="in use by another run"):
            runlock.RunLock(str(live)).acquire()
    finally:
        holder.release()


def test_config_files_are_read_only_when_they_are_moco_tfs_and_within_bounds(tmp_path):
    from moco_tf.training import checkpoint, checkpoint_files
    from moco_tf.training.config import PretrainConfig

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"arch": "resnet18", "learning_rate": 0.1, "architectures": ["x"]}))
    with pytest.raises(checkpoint_files.CheckpointError, match="not a moco_tf config: no format_version"):
        checkpoint.read_config(str(tmp_path))
    config.write_text(json.dumps({"arch": "resnet18", "momentum": 0.99, "moco_version": "v1"}))  # flat: not ours
    with pytest.raises(checkpoint_files.CheckpointError, match="not a moco_tf config: no format_version"):
        checkpoint.read_config(str(tmp_path))
    values = json.loads(PretrainConfig.from_flags({"arch": "resnet18", "width": 8}).to_json())
    for section, key, value, flag in (("model", "queue_size", 2**40, "--queue_size"), ("model", "dim", -3, "--dim"),
                                      ("optim", "lr", float("nan"), "--lr")):
        bad = json.loads(json.dumps(values))
        bad[section][key] = value
        config.write_text(json.dumps(bad))
        with pytest.raises(checkpoint_files.CheckpointError, match=flag):
            checkpoint.read_config(str(tmp_path))


def test_another_projects_checkpoints_are_refused_before_anything_moves(tmp_path):
    from moco_tf.training import checkpoint, checkpoint_files

    for folder in (tmp_path, tmp_path / "checkpoints"):
        folder.mkdir(exist_ok=True)
        (folder / "checkpoint").write_text('model_checkpoint_path: "ckpt-2"\n')
        (folder / "ckpt-2.index").write_bytes(b"\0" * 16)
        before = sorted(os.listdir(folder))
        with pytest.raises(checkpoint_files.CheckpointError, match="no moco_tf config.json: not touching them"):
            checkpoint.check_run_folder(str(tmp_path), None)
        assert sorted(os.listdir(folder)) == before
    (tmp_path / "lincls_config.json").write_text("{}")
    with pytest.raises(checkpoint_files.CheckpointError, match="holds a lincls run"):
        checkpoint.check_run_folder(str(tmp_path), None)


def test_a_symbolic_link_loop_in_an_image_folder_is_skipped(tmp_path):
    from moco_tf.data.sources import make_source

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name / f"{i}.png")
    os.symlink("..", tmp_path / "a" / "up")
    os.symlink(".", tmp_path / "b" / "self")
    source = make_source("folder", str(tmp_path))
    assert source.num_classes == 2 and source.num_examples("train") == 4


def test_values_an_export_records_have_the_bounds_of_their_flags():
    from moco_tf.training.config import ConfigError, check_recorded

    check_recorded({"arch": "resnet18", "width": 64, "image_size": 224, "dim": 128, "moco_version": "v2"}, "x")
    for bad, flag in (({"arch": "resnet50", "width": 10**6}, "--width"), ({"queue_size": 2**40, "dim": 128},
                      "--queue_size"), ({"image_size": -3}, "--image_size"), ({"temperature": float("nan")},
                      "--temperature")):
        with pytest.raises(ConfigError, match=f"export e: {flag}"):
            check_recorded(bad, "export e")
