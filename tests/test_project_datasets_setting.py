"""Where the tests find real data (tests/conftest.py): $MOCO_TF_DATASETS, a skip with a one-line
reason when the file is absent, and a failure instead under MOCO_TF_REQUIRE_DATASETS=1 (CI)."""

import os

import pytest

from tests.conftest import dataset_file, datasets_dir


def test_default_is_shared_datasets_beside_the_repository(monkeypatch):
    monkeypatch.delenv("MOCO_TF_DATASETS", raising=False)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert datasets_dir() == os.path.join(os.path.dirname(root), "shared", "datasets")


def test_absent_file_skips_and_ci_fails(monkeypatch, tmp_path):
    monkeypatch.setenv("MOCO_TF_DATASETS", str(tmp_path))
    monkeypatch.delenv("MOCO_TF_REQUIRE_DATASETS", raising=False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        dataset_file("cifar10-jpg.tar.gz")
    reason = str(skipped.value)
    assert str(tmp_path / "cifar10-jpg.tar.gz") in reason and "MOCO_TF_DATASETS" in reason
    assert "\n" not in reason

    monkeypatch.setenv("MOCO_TF_REQUIRE_DATASETS", "1")
    with pytest.raises(pytest.fail.Exception, match="MOCO_TF_REQUIRE_DATASETS=1 forbids skipping"):
        dataset_file("cifar10-jpg.tar.gz")

    (tmp_path / "cifar10-jpg.tar.gz").write_bytes(b"x")
    assert dataset_file("cifar10-jpg.tar.gz") == str(tmp_path / "cifar10-jpg.tar.gz")
