"""The tf.distribute strategy from a flag: default | mirrored | multi_worker | tpu | auto.

Multi-worker runs read the cluster from TF_CONFIG, validated here so that a malformed one is
reported in one line. A worker whose peers do not all join within `peer_timeout_s` stops with a
message naming the absent ones, and a peer that dies mid-run ends the survivors with a message
too (`peer_failures`), instead of the silent wait TensorFlow does by default.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import tensorflow as tf

from moco_tf.errors import RunFailed, RunInterrupted, UserError

STRATEGIES = ("auto", "default", "mirrored", "multi_worker", "tpu")
# Jobs a MultiWorkerMirroredStrategy trains with; "ps" and "evaluator" would need other code.
JOBS = ("chief", "worker")
TF_CONFIG_KEYS = ("cluster", "task", "rpc_layer", "environment")
# Hosts of a cluster are often started by hand or by a scheduler, minutes apart.
DEFAULT_PEER_TIMEOUT_S = 300.0
# A peer killed between two steps is not noticed by the next collective (its RPCs are retried):
# only missed heartbeats reveal it. Kept shorter than the start-up wait, which can be minutes.
HEARTBEAT_TIMEOUT_S = 30.0


class StrategyError(UserError):
    """The requested strategy cannot run here; the message says why in one line."""


class PeerLostError(RunFailed):
    """A worker of the cluster stopped answering during the run (killed, preempted, unreachable):
    not a user mistake, a run that cannot go on (the CLIs exit with status 1)."""


def make_strategy(
    name: str = "auto", tpu: str | None = None, peer_timeout_s: float = DEFAULT_PEER_TIMEOUT_S
) -> tf.distribute.Strategy:
    """Builds the strategy. `auto`: TPU if --tpu is given, multi-worker if TF_CONFIG names a
    cluster of several tasks, mirrored over all GPUs if there are several, else the default.

    `peer_timeout_s` (multi-worker only): how long to wait for every worker of TF_CONFIG to join;
    a worker silent for min(peer_timeout_s, HEARTBEAT_TIMEOUT_S) later counts as lost."""
    if name not in STRATEGIES:
        raise StrategyError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    if name == "auto":
        name = _auto(tpu)
    if name == "tpu":
        return _tpu(tpu)
    if name == "multi_worker":
        tf_config = read_tf_config()
        if tf_config is None:
            raise StrategyError(
                "--strategy=multi_worker needs TF_CONFIG with a cluster (see docs/training.md, several hosts)"
            )
        return multi_worker(tf_config, peer_timeout_s)
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


def has_accelerator(strategy: tf.distribute.Strategy) -> bool:
    """Whether the strategy's replicas run on GPUs or TPUs."""
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return True
    try:
        devices = strategy.extended.worker_devices
    except RuntimeError:  # the default strategy: TF places ops on the first GPU, if there is one
        return bool(tf.config.list_logical_devices("GPU"))
    return any(tf.DeviceSpec.from_string(d).device_type in ("GPU", "TPU") for d in devices)


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


# --- TF_CONFIG -------------------------------------------------------------------------------


def read_tf_config(text: str | None = None) -> dict[str, Any] | None:
    """TF_CONFIG (the environment's when `text` is None), checked: None when it names no cluster.

    TensorFlow itself fails on a malformed one with an AttributeError or KeyError deep inside
    the strategy, or waits forever on a task index outside the cluster."""
    if text is None:
        text = os.environ.get("TF_CONFIG", "")
    if not text.strip():
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise StrategyError(f"TF_CONFIG is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise StrategyError(
            f'TF_CONFIG must be a JSON object {{"cluster": ..., "task": ...}}, got {_json_type(config)}'
        )
    unknown = sorted(set(config) - set(TF_CONFIG_KEYS))
    if unknown:
        raise StrategyError(f"TF_CONFIG has unknown key {unknown[0]!r} (known: {', '.join(TF_CONFIG_KEYS)})")
    if config.get("cluster") is None:
        return None  # e.g. {} or only a task: no cluster, a single-process run
    cluster = _check_cluster(config["cluster"])
    _check_task(config.get("task"), cluster)
    return config


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _check_cluster(cluster: Any) -> dict[str, list[str]]:
    if not isinstance(cluster, dict):
        raise StrategyError(
            f'TF_CONFIG cluster must be an object {{"worker": ["host:port", ...]}}, got {_json_type(cluster)}'
        )
    if not cluster:
        raise StrategyError('TF_CONFIG cluster is empty; list the hosts: {"worker": ["host:port", ...]}')
    seen: dict[str, str] = {}
    for job, addresses in cluster.items():
        if job not in JOBS:
            raise StrategyError(
                f"TF_CONFIG cluster has job {job!r}; MultiWorkerMirroredStrategy trains with {' and '.join(JOBS)}"
            )
        if not isinstance(addresses, list) or not addresses:
            raise StrategyError(
                f'TF_CONFIG cluster "{job}" must be a non-empty list of "host:port" strings, '
                f"got {_json_type(addresses) if addresses != [] else 'an empty list'}"
            )
        for index, address in enumerate(addresses):
            _check_address(address, f'TF_CONFIG cluster "{job}"[{index}]')
            if address in seen:
                raise StrategyError(f"TF_CONFIG cluster lists {address} twice ({seen[address]} and {job} {index})")
            seen[address] = f"{job} {index}"
    if len(cluster.get("chief", [])) > 1:
        raise StrategyError(f'TF_CONFIG cluster "chief" lists {len(cluster["chief"])} hosts; there is one chief')
    return cluster


def _check_address(address: Any, where: str) -> None:
    if not isinstance(address, str):
        raise StrategyError(f'{where} must be a "host:port" string, got {_json_type(address)} {address!r}')
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise StrategyError(f'{where} is {address!r}, not "host:port" with a port in 1-65535')


def _check_task(task: Any, cluster: dict[str, list[str]]) -> None:
    example = f'{{"type": "{next(iter(cluster))}", "index": 0}}'
    if task is None:
        raise StrategyError(f"TF_CONFIG names a cluster but no task: give each host its own task, e.g. {example}")
    if not isinstance(task, dict):
        raise StrategyError(f"TF_CONFIG task must be an object like {example}, got {_json_type(task)}")
    kind, index = task.get("type"), task.get("index")
    if kind not in cluster:
        raise StrategyError(f"TF_CONFIG task type {kind!r} is not a job of the cluster ({', '.join(cluster)})")
    # bool is an int in Python; true/false as an index is a typo, not task 1/0.
    if not isinstance(index, int) or isinstance(index, bool):
        raise StrategyError(f"TF_CONFIG task index must be an integer, got {_json_type(index)} {index!r}")
    if not 0 <= index < len(cluster[kind]):
        raise StrategyError(
            f'TF_CONFIG task index {index} is outside cluster "{kind}", which lists {len(cluster[kind])} '
            f"host(s): 0 to {len(cluster[kind]) - 1}"
        )


def _cluster_tasks() -> int:
    config = read_tf_config()
    return 0 if config is None else sum(len(tasks) for tasks in config["cluster"].values())


def _auto(tpu: str | None) -> str:
    if tpu:
        return "tpu"
    if _cluster_tasks() > 1:
        return "multi_worker"
    if len(tf.config.list_physical_devices("GPU")) > 1:
        return "mirrored"
    return "default"


# --- Multi-worker: joining and losing peers ----------------------------------------------------


def multi_worker(tf_config: dict[str, Any], peer_timeout_s: float) -> tf.distribute.MultiWorkerMirroredStrategy:
    """MultiWorkerMirroredStrategy for the (validated) `tf_config`, which must be the environment's.

    TF's coordination service waits forever for the other tasks by default. Configured here
    before the strategy does it (TF keeps an existing configuration): a registration barrier with
    a deadline, and a deadline for missed heartbeats, so that a dead peer aborts the collectives."""
    if not (isinstance(peer_timeout_s, int | float) and math.isfinite(peer_timeout_s) and peer_timeout_s > 0):
        raise StrategyError(f"the peer timeout must be a positive number of seconds, got {peer_timeout_s}")
    cluster, task = tf_config["cluster"], tf_config["task"]
    _wait_for_peers(cluster, task, peer_timeout_s)
    # All peers are up; TF's own registration deadline remains for one that dies right now.
    _configure_coordination(cluster, int(peer_timeout_s * 1000), int(min(peer_timeout_s, HEARTBEAT_TIMEOUT_S) * 1000))
    try:
        # Collectives over the network; the communication backend is chosen by TF (NCCL on GPUs).
        return tf.distribute.MultiWorkerMirroredStrategy()
    except (tf.errors.DeadlineExceededError, tf.errors.UnavailableError) as error:
        absent = _peers_named(str(error), cluster, task) or _all_peers(cluster, task)
        raise StrategyError(
            f"{_describe(absent, cluster)} did not join within {peer_timeout_s:g} s; start the same command on "
            f"every host of TF_CONFIG, each with its own task index"
        ) from None
    except tf.errors.OpError as error:
        raise StrategyError(f"cannot start {task['type']} {task['index']} of TF_CONFIG: {_first_line(error)}") from None


def _wait_for_peers(cluster: dict[str, list[str]], task: dict[str, Any], timeout_s: float) -> None:
    """Returns once every other task of the cluster accepts TCP connections on its port.

    A rendezvous before TF's own: TF waits inside C++ holding the interpreter, so Ctrl-C and
    SIGTERM would do nothing for up to the whole timeout (TF even installs its own SIGTERM
    handler). Here the wait is in Python, interruptible, and knows which peers are missing.
    Until it sees them all, this task listens on its own port, so that peers waiting the same
    way see it; TF's server takes the port over right after."""
    own = (task["type"], int(task["index"]))
    own_port = int(cluster[own[0]][own[1]].rpartition(":")[2])
    pending = {peer: cluster[peer[0]][peer[1]] for peer in _all_peers(cluster, task)}
    if not pending:
        return
    try:
        if socket.has_dualstack_ipv6():
            listener = socket.create_server(("", own_port), family=socket.AF_INET6, dualstack_ipv6=True)
        else:
            listener = socket.create_server(("", own_port))
    except OSError as error:
        raise StrategyError(
            f"port {own_port} of {_describe([own], cluster)} is in use on this host ({error.strerror}): another "
            "run, or a TF_CONFIG task index that belongs to another host"
        ) from None
    listener.setblocking(False)
    unknown_hosts: set[tuple[str, int]] = set()
    deadline = time.monotonic() + timeout_s
    with listener, _signals_interrupt("waiting for the workers of TF_CONFIG to join; nothing was trained"):
        while pending:
            with contextlib.suppress(OSError):
                while True:  # drain the peers' probes
                    listener.accept()[0].close()
            for peer, address in list(pending.items()):
                host, _, port = address.rpartition(":")
                try:
                    socket.create_connection((host.strip("[]"), int(port)), timeout=1.0).close()
                    del pending[peer]
                    unknown_hosts.discard(peer)
                except socket.gaierror:
                    unknown_hosts.add(peer)
                except OSError:
                    pass
            if pending and time.monotonic() > deadline:
                missing = ", ".join(
                    f"{job} {index} ({cluster[job][index]}{', unknown host' if (job, index) in unknown_hosts else ''})"
                    for job, index in pending
                )
                raise StrategyError(
                    f"{missing} did not join within {timeout_s:g} s; start the same command on every host of "
                    "TF_CONFIG, each with its own task index"
                )
            if pending:
                time.sleep(0.5)


@contextlib.contextmanager
def _signals_interrupt(doing: str) -> Iterator[None]:
    """SIGTERM and SIGINT end the block with errors.RunInterrupted (one line, status 128 + signal)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        raise RunInterrupted(f"stopped by {signal.Signals(signum).name} while {doing}", signum)

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _configure_coordination(cluster: dict[str, list[str]], register_ms: int, heartbeat_ms: int) -> None:
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.eager import context

    ctx = context.context()
    if ctx.coordination_service is not None:
        return  # configured by an earlier strategy of this process; TF cannot change it now
    leader = "/job:chief/replica:0/task:0" if "chief" in cluster else "/job:worker/replica:0/task:0"
    ctx.configure_coordination_service(
        service_type="standalone",  # what MultiWorkerMirroredStrategy itself would configure
        service_leader=leader,
        cluster_register_timeout_in_ms=register_ms,
        heartbeat_timeout_in_ms=heartbeat_ms,
        coordinated_jobs=[
            coordination_config_pb2.CoordinatedJob(name=job, num_tasks=len(cluster[job]))
            for job in JOBS if job in cluster
        ],
    )
    # Without the barrier a task registers alone and the wait for the others has no deadline;
    # configure_coordination_service() has no argument for it.
    ctx.coordination_service.cluster_register_with_barrier = True


_TASK_NAME = re.compile(r"/job:(\w+)/replica:\d+/task:(\d+)")


def _peers_named(message: str, cluster: dict[str, list[str]], task: dict[str, Any]) -> list[tuple[str, int]]:
    """The other tasks of the cluster that TF names in an error message, in order of mention."""
    own = (task["type"], int(task["index"]))
    named: list[tuple[str, int]] = []
    for job, index in _TASK_NAME.findall(message):
        peer = (job, int(index))
        if peer != own and peer not in named and job in cluster and peer[1] < len(cluster[job]):
            named.append(peer)
    return named


def _all_peers(cluster: dict[str, list[str]], task: dict[str, Any]) -> list[tuple[str, int]]:
    own = (task["type"], int(task["index"]))
    return [(job, i) for job in cluster for i in range(len(cluster[job])) if (job, i) != own]


def _describe(peers: list[tuple[str, int]], cluster: dict[str, list[str]]) -> str:
    return ", ".join(f"{job} {index} ({cluster[job][index]})" for job, index in peers)


def _first_line(error: BaseException | str) -> str:
    # TF prefixes eager errors with a line that says nothing ("Graph execution error:").
    lines = [line.strip() for line in str(error).splitlines() if line.strip() and "execution error" not in line]
    if lines:
        return lines[0][:300]
    return type(error).__name__ if isinstance(error, BaseException) else "unknown error"


def _is_peer_failure(error: BaseException, named: list[tuple[str, int]]) -> bool:
    text = str(error)
    # Collectives aborted by a failed peer surface as Unavailable, DeadlineExceeded, Cancelled or
    # Internal; an Unavailable from elsewhere (a storage bucket) names no task and is not one.
    if "Collective ops is aborted" in text or "heartbeat" in text:
        return True
    return bool(named) and isinstance(error, tf.errors.UnavailableError | tf.errors.DeadlineExceededError)


@contextlib.contextmanager
def peer_failures(strategy: tf.distribute.Strategy | None = None) -> Iterator[None]:
    """Turns the error a multi-worker process gets when a peer dies mid-run (a collective
    aborted: connection reset, or heartbeats missed for the peer timeout) into one PeerLostError
    line naming the peer. Other strategies and other errors pass through unchanged.

    Without `strategy` the cluster is TF_CONFIG's, so it can wrap code that makes the strategy."""
    try:
        yield
    except tf.errors.OpError as error:
        if strategy is not None and not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            raise
        try:
            tf_config = read_tf_config()
        except StrategyError:
            tf_config = None
        if tf_config is None or not isinstance(tf_config.get("task"), dict):
            raise
        cluster, task = tf_config["cluster"], tf_config["task"]
        lost = _peers_named(str(error), cluster, task)
        if not _is_peer_failure(error, lost):
            raise
        raise PeerLostError(_peer_failure_message(str(error), lost, cluster)) from None


def _peer_failure_message(text: str, lost: list[tuple[str, int]], cluster: dict[str, list[str]]) -> str:
    then = "restart the same command on every host of TF_CONFIG to resume from the last checkpoint"
    if _OUT_OF_STEP.search(text):
        # Not a dead peer: one worker ran another collective than the others (it stopped, saved or
        # resumed at another step). Every worker must take the same decisions at the same step.
        return f"the workers of TF_CONFIG went out of step (one stopped or resumed at another step); {then}"
    who = _describe(lost, cluster) if lost else "a worker of TF_CONFIG"
    if "heartbeat" in text:
        reason = "it stopped sending heartbeats"
    elif re.search(r"connection (reset|refused|closed)|socket closed", text, re.IGNORECASE):
        reason = "its connection closed"
    else:
        aborted = re.search(r"Collective ops is aborted by: (.+)", text)
        reason = aborted.group(1).strip()[:300] if aborted else _first_line(text)
    return f"lost {who}: {reason}; {then}"


_OUT_OF_STEP = re.compile(r"Collective instance \d+ expected")


def check_same_on_all_workers(strategy: tf.distribute.Strategy, value: int, what: str, hint: str = "") -> None:
    """Raises StrategyError, on every worker alike, when the workers of a multi-worker run hold
    different `value`s: e.g. the step each one restored, which differs when model_dir is not one
    folder that all of them read (a local path on several hosts). TF would not notice: each worker
    trains on from its own state and the copies of the weights silently drift apart."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return
    per_replica = strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant([value], tf.int64)
    )
    values = [int(v) for v in strategy.gather(per_replica, axis=0).numpy()]  # replicas in cluster order
    if len(set(values)) == 1:
        return
    spec = strategy.cluster_resolver.cluster_spec().as_dict()
    tasks = [(job, i) for job in ("chief", "worker") if job in spec for i in range(len(spec[job]))]
    per_worker = max(len(values) // len(tasks), 1)
    held = ", ".join(f"{job} {i} has {values[n * per_worker]}" for n, (job, i) in enumerate(tasks))
    raise StrategyError(f"the workers of TF_CONFIG disagree on {what}: {held}{'; ' + hint if hint else ''}")


def any_worker(strategy: tf.distribute.Strategy, flag: bool) -> bool:
    """Whether `flag` is true on any worker: every worker gets the same answer. For decisions that
    change what runs next (stop on a signal, save now): a worker deciding alone runs other
    collectives than the others, and all of them fail ("went out of step"). One tiny all-reduce;
    call it at the same point on every worker (e.g. each step's end)."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return flag
    per_replica = strategy.experimental_distribute_values_from_function(
        lambda context: tf.constant(1 if flag else 0, tf.int32)
    )
    return int(strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)) > 0


# --- Input: one pipeline per host -------------------------------------------------------------


def per_host_dataset(
    strategy: tf.distribute.Strategy, dataset_fn: Callable[[tf.distribute.InputContext], tf.data.Dataset]
) -> tf.distribute.DistributedDataset:
    """The run's input as a pod or a multi-worker cluster needs it: one tf.data pipeline per host
    (per worker process; one in all on a single host), made on that host by `dataset_fn(context)`.

    `dataset_fn` must itself read only its host's shard, pipeline `context.input_pipeline_id` of
    `context.num_input_pipelines`, and batch `context.get_per_replica_batch_size(global_batch)`
    examples (moco_tf.data.pipelines does both); the strategy then hands each of the host's
    replicas one batch per step, so a step's global batch is every replica's batch together and
    no two hosts read the same example. Nothing is sharded behind its back (auto-sharding applies
    only to datasets made once for all hosts, which would read every file on every host)."""
    return strategy.distribute_datasets_from_function(dataset_fn)


# --- TPU -------------------------------------------------------------------------------------


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
