"""moco_tf.atomic_write on its own: a file written all or nothing with a plain file's permissions,
the temporary files a kill leaves (and only those) removed, a full disk in one line. The folder
replacement is exercised through its writers (tests/test_interop_hub.py, tests/test_cli_export_formats.py,
tests/test_interop_torch.py)."""

from __future__ import annotations

import errno
import os

import pytest

from moco_tf import atomic_write


def test_write_atomic_leaves_one_file_with_a_plain_files_permissions(tmp_path):
    path = str(tmp_path / "config.json")
    umask = os.umask(0o022)
    try:
        atomic_write.write_atomic(path, b"{}")
        atomic_write.write_atomic(path, b'{"a": 1}')
    finally:
        os.umask(umask)
    assert os.listdir(tmp_path) == ["config.json"]
    assert (tmp_path / "config.json").read_bytes() == b'{"a": 1}'
    assert os.stat(path).st_mode & 0o777 == 0o644


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = str(tmp_path / "config.json")
    atomic_write.write_atomic(path, b"old")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as raised:
        atomic_write.write_atomic(path, b"new")
    assert atomic_write.is_disk_full(raised.value)
    assert os.listdir(tmp_path) == ["config.json"] and (tmp_path / "config.json").read_bytes() == b"old"
    with pytest.raises(atomic_write.DiskFullError) as one_line:
        atomic_write.raise_if_disk_full(raised.value, "config", path, previous=False)
    assert str(one_line.value) == f"no space left on device while writing {path}; free some space and rerun"


def test_remove_temp_files_removes_only_what_killed_writes_of_that_file_left(tmp_path):
    ours = [".config.json.0a1b2c3d.tmp"]  # what write_atomic makes, local or remote (gs://)
    kept = ["config.json", ".config.json.notours.tmp", ".other.json.0a1b2c3d.tmp", "notes.tmp", "config.json.tmp"]
    for name in ours + kept:
        (tmp_path / name).write_text("x")
    (tmp_path / ".config.json.deadbeef.tmp").mkdir()  # a folder is never one of these files
    removed = atomic_write.remove_temp_files(str(tmp_path / "config.json"))
    assert sorted(os.path.basename(p) for p in removed) == sorted(ours)
    assert sorted(os.listdir(tmp_path)) == sorted([*kept, ".config.json.deadbeef.tmp"])


def test_a_remote_path_is_written_through_a_temporary_name_only_write_atomic_makes():
    import tensorflow as tf

    folder = "ram://atomic_write_test"
    tf.io.gfile.makedirs(folder)
    user = f"{folder}/config.json.tmp"  # a user's file that a fixed temporary name would overwrite
    with tf.io.gfile.GFile(user, "w") as f:
        f.write("mine")
    atomic_write.write_atomic(f"{folder}/config.json", b"ours")
    with tf.io.gfile.GFile(f"{folder}/config.json", "rb") as f:
        assert f.read() == b"ours"
    with tf.io.gfile.GFile(user) as f:
        assert f.read() == "mine"
    assert sorted(tf.io.gfile.listdir(folder)) == ["config.json", "config.json.tmp"]
