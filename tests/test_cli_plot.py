"""`python -m moco_tf.plot` / moco_tf.evaluation.curves: scalars written as training writes them
(Keras's TensorBoard callback and the kNN monitor) come back as written, placed at the right
optimizer steps, and are drawn into a PNG; a folder without events is one line."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from moco_tf.cli import UsageError
from moco_tf.errors import UserError
from moco_tf.evaluation import curves
from moco_tf.evaluation.pictures import summary_scalar
from moco_tf.plot import PNG_MAGIC, check_out
from tests.support.helpers import run


def _write(model_dir, with_self_neg=False):
    """Three epochs of 4 steps, batch scalars every 2 steps, a resume that redoes step 6."""
    logs = os.path.join(model_dir, "logs")
    written = {"loss": [], "acc": []}
    with tf.summary.create_file_writer(os.path.join(logs, "train")).as_default():
        for step in (2, 4, 6, 8, 6, 8, 10, 12):  # killed after 8, resumed from the checkpoint at 5
            loss, acc = 9.0 - 0.5 * step, 0.05 * step
            tf.summary.scalar("batch_loss", loss, step=step)
            tf.summary.scalar("batch_acc", acc, step=step)
            tf.summary.scalar("batch_logit_pos", 0.5 + 0.01 * step, step=step)
            tf.summary.scalar("batch_logit_neg", 0.1, step=step)
            if with_self_neg:
                tf.summary.scalar("batch_self_neg", 0.25, step=step)
            written["loss"].append((step, loss))
            written["acc"].append((step, acc))
        for epoch, lr in enumerate((0.06, 0.045, 0.015)):
            tf.summary.scalar("epoch_lr", lr, step=epoch)  # Keras: the 0-based epoch index
    with tf.summary.create_file_writer(os.path.join(logs, "knn")).as_default():
        summary_scalar("knn_top1", 41.5, 3)  # the kNN monitor: epochs done
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump({"optim": {"batch_size": 8}, "data": {"dataset": "digits"}, "runtime": {"steps_per_epoch": 4}}, f)
    return written


def test_series_come_back_as_written_and_the_png_is_drawn(tmp_path):
    model_dir = str(tmp_path / "run")
    written = _write(model_dir)
    data = curves.curves(model_dir)
    steps, loss = data["train/batch_loss"]
    # The resumed steps 6 and 8 replace the first ones (the later write wins); sorted by step.
    np.testing.assert_array_equal(steps, [2, 4, 6, 8, 10, 12])
    expected = dict(written["loss"])
    np.testing.assert_allclose(loss, [expected[s] for s in steps], rtol=1e-6)
    np.testing.assert_allclose(data["train/batch_acc"][1], [0.05 * s for s in steps], rtol=1e-6)
    lr_steps, lr = data["train/epoch_lr"]
    np.testing.assert_array_equal(lr_steps, [4, 8, 12])  # each epoch's value at the step that ends it
    np.testing.assert_allclose(lr, [0.06, 0.045, 0.015], rtol=1e-6)
    np.testing.assert_array_equal(data["knn/knn_top1"][0], [12])
    np.testing.assert_allclose(data["knn/knn_top1"][1], [41.5])

    out = str(tmp_path / "pictures" / "curves.png")
    panels = curves.plot(model_dir, out)
    assert open(out, "rb").read(8) == PNG_MAGIC and os.path.getsize(out) > 10_000
    assert "learning rate" in panels and not any(p.startswith("self_neg") for p in panels)


def test_self_neg_panel_when_logged(tmp_path):
    model_dir = str(tmp_path / "run")
    _write(model_dir, with_self_neg=True)
    panels = curves.plot(model_dir, str(tmp_path / "c.png"))
    assert any(p.startswith("self_neg") for p in panels)


def test_no_events_is_one_line_and_no_user_file_is_replaced(tmp_path):
    with pytest.raises(curves.NoEventsError, match="holds no TensorBoard scalars"):
        curves.curves(str(tmp_path))
    # The command line: one line (after TensorFlow's own start-up notices, if any), exit 2.
    result = run("-m", "moco_tf.plot", f"--model_dir={tmp_path}", f"--out={tmp_path / 'c.png'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path} holds no TensorBoard scalars")
    notes = tmp_path / "notes.png"
    notes.write_text("my notes")
    with pytest.raises(UserError, match="exists and was not written by moco_tf: not replacing it"):
        check_out(str(notes))
    assert notes.read_text() == "my notes"
    with pytest.raises(UsageError, match="must be a .png file"):
        check_out(str(tmp_path / "curves.jpg"))
