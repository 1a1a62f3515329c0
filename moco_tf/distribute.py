"""The tf.distribute strategy from a flag: default | mirrored | multi_worker | tpu | auto."""

from __future__ import annotations

import json
import os

import tensorflow as tf

STRATEGIES = ("auto", "default", "mirrored", "multi_worker", "tpu")


class StrategyError(ValueError):
    """The requested strategy cannot run here; the message says why in one line."""


def make_strategy(name: str = "auto", tpu: str | None = None) -> tf.distribute.Strategy:
    """Builds the strategy. `auto`: TPU if --tpu is given, multi-worker if TF_CONFIG names a
    cluster of several tasks, mirrored over all GPUs if there are several, else the default."""
    if name not in STRATEGIES:
        raise StrategyError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    if name == "auto":
        name = _auto(tpu)
    if name == "tpu":
        return _tpu(tpu)
    if name == "multi_worker":
        if not _cluster_tasks():
            raise StrategyError("--strategy=multi_worker needs TF_CONFIG with a cluster (see README: several hosts)")
        # Collectives over the network; the communication backend is chosen by TF (NCCL on GPUs).
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "mirrored":
        return mirrored()
    return tf.distribute.get_strategy()


def mirrored(devices: list[str] | None = None) -> tf.distribute.MirroredStrategy:
    """MirroredStrategy over `devices` (all GPUs when None).

    Without GPUs the reduction goes through one device: TF's default for CPUs, a ring
    all-reduce, sums chunks in a different order on each device, so replica copies of the
    weights would drift apart by float rounding. NCCL on GPUs gives every device the same sum.
    """
    gpus = tf.config.list_logical_devices("GPU")
    if devices is None and not gpus:
        devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    on_cpu = devices is not None and all("CPU" in d.upper() for d in devices)
    ops = tf.distribute.ReductionToOneDevice() if on_cpu or not gpus else None
    return tf.distribute.MirroredStrategy(devices, cross_device_ops=ops)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes checkpoints, logs and exports (one writer per cluster)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type in (None, "chief"):
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and not has_chief


def _cluster_tasks() -> int:
    try:
        cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    except json.JSONDecodeError as error:
        raise StrategyError(f"TF_CONFIG is not valid JSON: {error}") from None
    return sum(len(tasks) for tasks in cluster.values())


def _auto(tpu: str | None) -> str:
    if tpu:
        return "tpu"
    if _cluster_tasks() > 1:
        return "multi_worker"
    if len(tf.config.list_physical_devices("GPU")) > 1:
        return "mirrored"
    return "default"


def _tpu(tpu: str | None) -> tf.distribute.TPUStrategy:
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "local")
        if tpu not in (None, "", "local"):
            tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise StrategyError(f"no TPU found (--tpu={tpu or 'local'}): {first_line}") from None
    return tf.distribute.TPUStrategy(resolver)
