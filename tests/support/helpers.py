"""Helpers shared by the test modules: running a command in a fresh interpreter, random BatchNorm
statistics, a tiny exportable Keras model, and a snapshot of a folder tree."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = os.path.join(ROOT, ".venv", "bin", "python")
if not os.path.exists(PYTHON):
    PYTHON = sys.executable


def randomize(model, seed: int = 0) -> None:
    """Random BN affine parameters and statistics, so inference and training modes differ."""
    rng = np.random.RandomState(seed)
    for weight in model.weights:
        name = weight.path.rsplit("/", 1)[-1]
        shape = tuple(weight.shape)
        if name in ("gamma", "moving_variance"):
            weight.assign(rng.uniform(0.5, 1.5, shape).astype(np.float32))
        elif name in ("beta", "moving_mean"):
            weight.assign(rng.normal(0.0, 0.1, shape).astype(np.float32))


# A training run of a few seconds: the quickstart's recipe on a width-8 ResNet-18, 2 steps an epoch.
TINY = [
    "--flagfile=configs/quickstart.flags", "--batch_size=32", "--queue_size=64", "--bn_groups=2",
    "--steps_per_epoch=2", "--epochs=3", "--knn_every=0", "--checkpoint_every=1", "--seed=1", "--width=8",
    "--export_dir=",  # not the flagfile's export/quickstart: tests write only under tmp_path
]

# The environment of every command a test runs in a fresh interpreter: quiet, bit-stable kernels.
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0", "PYTHONPATH": ROOT}


def run(*args, timeout=300):
    return subprocess.run([PYTHON, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def free_ports(n: int) -> list[int]:
    """n TCP ports free on 127.0.0.1 right now (for local multi-worker clusters)."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def run_local_workers(module_args: list[list[str]], timeout: int = 300) -> list[tuple[int, str, str]]:
    """`python -m ...` once per worker of a local cluster on 127.0.0.1 (TF_CONFIG, worker i gets
    module_args[i]), all at once; (return code, stdout, stderr) per worker. Kills leftovers."""
    import json

    workers = [f"127.0.0.1:{p}" for p in free_ports(len(module_args))]
    procs = []
    for i, args in enumerate(module_args):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}
        procs.append(subprocess.Popen(
            [PYTHON, *args], cwd=ROOT, env={**ENV, "TF_CONFIG": json.dumps(tf_config)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))  # fmt: skip
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs, strict=True)]


def image_folder(root, counts: dict[str, int], split: str) -> None:
    """root/split/<class>/<i>.png: counts[class] tiny 8x8 images of distinct grey levels."""
    import tensorflow as tf

    for name, n in counts.items():
        folder = root / split / name
        folder.mkdir(parents=True)
        for i in range(n):
            pixels = np.full((8, 8, 3), (i * 7) % 255, np.uint8)
            (folder / f"{i}.png").write_bytes(tf.io.encode_png(pixels).numpy())


def labelled_folder_datasets(root, batch: int, image_size: int = 16):
    """(train, val) labelled pipelines over a folder of 24 train and 4 test images in 2 classes,
    train shuffled with augmentation. Files are read with ignore_errors: a dataset of unknown
    length, the case where Keras 3 counted one optimizer iteration more per epoch than batches."""
    from moco_tf.data import pipelines, sources

    image_folder(root, {"a": 12, "b": 12}, "train")
    image_folder(root, {"a": 2, "b": 2}, "test")
    source = sources.make_source("folder", str(root))
    train = pipelines.labelled_dataset(source, "train", image_size, batch, train_aug=True, shuffle=True, seed=0)
    return train, pipelines.labelled_dataset(source, "test", image_size, batch)


def tiny_backbone():
    """Any images -> features Keras model exports; this one saves in a fraction of a second."""
    import keras

    inputs = keras.Input((None, None, 3))
    features = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 1)(inputs))
    return keras.Model(inputs, features)


def tree(root) -> dict[str, bytes | None]:
    """Every path under root (root included) -> its bytes (None for a folder): to check that
    nothing was touched."""
    root = str(root)
    out = {".": None}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            out[os.path.relpath(os.path.join(folder, name), root)] = None
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                out[os.path.relpath(os.path.join(folder, name), root)] = f.read()
    return out


def weights_snapshot(model) -> dict[str, np.ndarray]:
    """A copy of every variable of a Keras model (or a FrozenBackbone's) by path, to check later that
    nothing changed."""
    model = getattr(model, "model", model)
    return {v.path: np.array(v) for v in model.weights}
