"""Test set-up: quiet TF, two logical CPU devices for MirroredStrategy tests, fixed seeds, and
where the real datasets are.

Tests that need real data (the CIFAR-10 JPEGs) take the `cifar10_tar` fixture. It looks in
$MOCO_TF_DATASETS (default: ../shared/datasets beside the repository) and skips with a one-line
reason when the file is not there; with MOCO_TF_REQUIRE_DATASETS=1 (set by .ci/run) the same
absence fails the tests instead, so CI cannot pass by skipping them.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # bit-stable CPU kernels for the references

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASETS_VARIABLE, REQUIRE_VARIABLE = "MOCO_TF_DATASETS", "MOCO_TF_REQUIRE_DATASETS"
SKIP_PREFIX = "needs real data"
_data_skips = []


def datasets_dir() -> str:
    """The folder holding the real datasets: $MOCO_TF_DATASETS, else ../shared/datasets."""
    return os.path.abspath(os.environ.get(DATASETS_VARIABLE) or os.path.join(ROOT, "..", "shared", "datasets"))


def dataset_file(name: str) -> str:
    """Path of a real dataset file; skips the calling test (fails it under
    MOCO_TF_REQUIRE_DATASETS=1) when the file is not there."""
    path = os.path.join(datasets_dir(), name)
    if not os.path.isfile(path):
        reason = f"{SKIP_PREFIX}: no {path} (set {DATASETS_VARIABLE} to the folder that holds it)"
        if os.environ.get(REQUIRE_VARIABLE) == "1":
            pytest.fail(f"{reason}; {REQUIRE_VARIABLE}=1 forbids skipping", pytrace=False)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def cifar10_tar() -> str:
    """Path of cifar10-jpg.tar.gz (folders train/<class>/<n>.jpg, test/<class>/<n>.jpg)."""
    return dataset_file("cifar10-jpg.tar.gz")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and SKIP_PREFIX in str(report.longrepr):
        _data_skips.append(report.nodeid)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    # `-q` prints no skip reasons: say once why these were skipped and how to run them.
    if _data_skips:
        terminalreporter.write_line(
            f"{len(_data_skips)} tests skipped: they need real data, not found in {datasets_dir()} "
            f"(set {DATASETS_VARIABLE} to run them)"
        )


@pytest.fixture(autouse=True)
def _seed():
    import keras

    keras.utils.set_random_seed(0)
    yield
    keras.backend.clear_session()

