"""TF_CONFIG validation, the peer timeout of multi-worker start-up, and the message for a lost peer."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import tensorflow as tf

from moco_tf import cli
from moco_tf.training import distribute
from tests.support.helpers import ENV, free_ports

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWO = {"worker": ["127.0.0.1:2222", "127.0.0.1:2223"]}


def _config(cluster=TWO, task=None, **extra):
    return json.dumps({"cluster": cluster, "task": task or {"type": "worker", "index": 0}, **extra})


BAD_TF_CONFIGS = [
    ("[1,2]", "must be a JSON object"),
    ('"worker"', "must be a JSON object"),
    ('{"cluster": ', "not valid JSON"),
    (json.dumps({"clusters": TWO}), "unknown key 'clusters'"),
    (json.dumps({"cluster": ["127.0.0.1:2222"], "task": {"type": "worker", "index": 0}}), "cluster must be an object"),
    (json.dumps({"cluster": {}, "task": {"type": "worker", "index": 0}}), "cluster is empty"),
    (_config({"ps": ["h:1"], "worker": ["h:2"]}), "has job 'ps'"),
    (_config({"worker": "h:1,h:2"}), 'cluster "worker" must be a non-empty list'),
    (_config({"worker": []}), "got an empty list"),
    (_config({"worker": ["h:1", 2223]}), '"worker"[1] must be a "host:port" string'),
    (_config({"worker": ["h:1", None]}), "got null"),
    (_config({"worker": ["localhost"]}), "not \"host:port\""),
    (_config({"worker": [":2222"]}), "not \"host:port\""),
    (_config({"worker": ["h:0"]}), "port in 1-65535"),
    (_config({"worker": ["h:99999"]}), "port in 1-65535"),
    (_config({"worker": ["h:port"]}), "port in 1-65535"),
    (_config({"worker": ["h:1", "h:1"]}), "lists h:1 twice (worker 0 and worker 1)"),
    (_config({"chief": ["h:1", "h:2"], "worker": ["h:3"]}, {"type": "chief", "index": 0}), "there is one chief"),
    (json.dumps({"cluster": TWO}), "no task"),
    (_config(task=[0]), "task must be an object"),
    (_config(task={"type": "chief", "index": 0}), "task type 'chief' is not a job of the cluster (worker)"),
    (_config(task={"index": 0}), "task type None is not a job"),
    (_config(task={"type": "worker", "index": "1"}), "index must be an integer, got a string '1'"),
    (_config(task={"type": "worker", "index": True}), "index must be an integer"),
    (_config(task={"type": "worker"}), "index must be an integer, got null"),
    (_config(task={"type": "worker", "index": 2}), 'index 2 is outside cluster "worker", which lists 2 host(s)'),
    (_config(task={"type": "worker", "index": -1}), "index -1 is outside"),
]


@pytest.mark.parametrize("text, fragment", BAD_TF_CONFIGS)
def test_bad_tf_config_is_one_line_naming_the_fault(text, fragment, monkeypatch):
    with pytest.raises(distribute.StrategyError) as error:
        distribute.read_tf_config(text)
    assert fragment in str(error.value) and "\n" not in str(error.value)
    # make_strategy checks it the same way for both strategies that read TF_CONFIG.
    monkeypatch.setenv("TF_CONFIG", text)
    for name in ("auto", "multi_worker"):
        with pytest.raises(distribute.StrategyError, match="TF_CONFIG"):
            distribute.make_strategy(name)


@pytest.mark.parametrize("text", ["", "  ", "{}", json.dumps({"task": {"type": "worker", "index": 0}})])
def test_tf_config_without_cluster_means_one_process(text, monkeypatch):
    assert distribute.read_tf_config(text) is None
    monkeypatch.setenv("TF_CONFIG", text)
    assert distribute.make_strategy("auto") is tf.distribute.get_strategy()
    with pytest.raises(distribute.StrategyError, match="needs TF_CONFIG with a cluster"):
        distribute.make_strategy("multi_worker")


def test_good_tf_configs_pass_unchanged():
    chief = {"cluster": {"chief": ["h:1"], "worker": ["h:2", "h:3"]}, "task": {"type": "worker", "index": 1},
             "rpc_layer": "grpc", "environment": "cloud"}
    assert distribute.read_tf_config(json.dumps(chief)) == chief
    single = json.loads(_config({"worker": ["localhost:5000"]}))
    assert distribute.read_tf_config(json.dumps(single)) == single


@pytest.mark.parametrize("timeout", [0, -5, math.nan, math.inf])
def test_peer_timeout_must_be_positive_and_finite(timeout, monkeypatch):
    monkeypatch.setenv("TF_CONFIG", _config())
    with pytest.raises(distribute.StrategyError, match="peer timeout must be a positive number"):
        distribute.make_strategy("multi_worker", peer_timeout_s=timeout)


def test_cli_reports_malformed_tf_config_in_one_line():
    tiny = ["--flagfile=configs/quickstart.flags", "--batch_size=32", "--queue_size=64", "--steps_per_epoch=1",
            "--epochs=1", "--knn_every=0", "--width=8", "--model_dir=/nonexistent/never-created"]
    result = subprocess.run(
        [sys.executable, "-m", "moco_tf.train", *tiny], cwd=ROOT, env={**ENV, "TF_CONFIG": "[1,2]"},
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ['error: TF_CONFIG must be a JSON object {"cluster": ..., "task": ...}, got a list']


def _cluster_env(monkeypatch, workers, index):
    tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(tf_config))


def test_absent_peer_named_after_the_timeout(monkeypatch):
    """The Python rendezvous before TF's: no TF state is touched when it fails."""
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)] + ["no-such-host.invalid:2222"]
    _cluster_env(monkeypatch, workers, 0)
    start = time.monotonic()
    with pytest.raises(distribute.StrategyError) as error:
        distribute.make_strategy("multi_worker", peer_timeout_s=1.5)
    assert 1.5 <= time.monotonic() - start < 10
    assert str(error.value) == (
        f"worker 1 ({workers[1]}), worker 2 (no-such-host.invalid:2222, unknown host) did not join within 1.5 s; "
        "start the same command on every host of TF_CONFIG, each with its own task index"
    )


def test_own_port_in_use_is_reported(monkeypatch):
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    _cluster_env(monkeypatch, workers, 1)
    with socket.create_server(("127.0.0.1", int(workers[1].rpartition(":")[2]))):
        with pytest.raises(distribute.StrategyError, match=rf"port \d+ of worker 1 \({workers[1]}\) is in use"):
            distribute.make_strategy("multi_worker", peer_timeout_s=5)


def test_rendezvous_listens_on_own_port_until_the_peers_are_up():
    workers = [f"127.0.0.1:{port}" for port in free_ports(3)]
    task = {"type": "worker", "index": 0}
    seen_me = threading.Event()
    peers = []

    def other_workers_start():
        # A peer waiting the same way finds this worker's port open ...
        with socket.create_connection(("127.0.0.1", int(workers[0].rpartition(":")[2])), timeout=5):
            seen_me.set()
        # ... then both others come up.
        peers.extend(socket.create_server(("127.0.0.1", int(w.rpartition(":")[2]))) for w in workers[1:])

    timer = threading.Timer(1.0, other_workers_start)
    timer.start()
    start = time.monotonic()
    try:
        distribute._wait_for_peers({"worker": workers}, task, timeout_s=30)
    finally:
        timer.join()
        for peer in peers:
            peer.close()
    assert seen_me.is_set() and time.monotonic() - start < 10


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_the_wait_at_once(sig):
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    before = signal.getsignal(sig)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), sig))
    timer.start()
    start = time.monotonic()
    with pytest.raises(cli.RunInterrupted) as stop:
        distribute._wait_for_peers({"worker": workers}, {"type": "worker", "index": 0}, timeout_s=60)
    timer.join()
    assert time.monotonic() - start < 5
    assert stop.value.signum == sig
    assert str(stop.value) == (
        f"stopped by {sig.name} while waiting for the workers of TF_CONFIG to join; nothing was trained"
    )
    assert signal.getsignal(sig) == before


# One process of a 2-worker cluster, reported as the CLIs report it.
_ALONE = """
import sys, time
from moco_tf import cli
from moco_tf.training import distribute
def main(argv):
    start = time.monotonic()
    try:
        distribute.make_strategy("multi_worker", peer_timeout_s=float(argv[1]))
    finally:
        print(f"waited {time.monotonic() - start:.1f} s", flush=True)
cli.run(main, user_errors=(distribute.StrategyError,))
"""


def test_peer_that_never_registers_with_tf_fails_within_the_timeout():
    """Past the rendezvous, TF's registration barrier has the same deadline. The absent peer's
    port is held by a socket that accepts TCP and never speaks gRPC (a peer that died right after
    the rendezvous, or another program on its port). Worker 0 (TF's coordination leader) and
    worker 1 run alone, in two clusters at once."""
    timeout = 5
    ports = free_ports(4)
    clusters = [[f"127.0.0.1:{p}" for p in ports[:2]], [f"127.0.0.1:{p}" for p in ports[2:]]]
    silent = [socket.create_server(("127.0.0.1", ports[1])), socket.create_server(("127.0.0.1", ports[2]))]
    procs = []
    try:
        for index, workers in enumerate(clusters):  # cluster 0 runs only worker 0, cluster 1 only worker 1
            tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
            procs.append(subprocess.Popen(
                [sys.executable, "-c", _ALONE, str(timeout)], cwd=ROOT,
                env={**ENV, "TF_CONFIG": json.dumps(tf_config)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True,
            ))
        outputs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for s in silent:
            s.close()
    absent = [f"worker 1 ({clusters[0][1]})", f"worker 0 ({clusters[1][0]})"]
    for p, (out, err), who in zip(procs, outputs, absent, strict=True):
        assert p.returncode == 2, err[-3000:]
        assert "Traceback" not in err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert errors == [
            f"error: {who} did not join within {timeout} s; start the same command on every host of TF_CONFIG, "
            "each with its own task index"
        ]
        # Bounded: the registration deadline plus TF's own RPC deadline, not a wait for ever.
        waited = float(out.split("waited ")[1].split(" s")[0])
        assert timeout <= waited < timeout + 30, out


_AGREE = """
import sys
from moco_tf import cli
from moco_tf.training import distribute
def main(argv):
    strategy = distribute.make_strategy("multi_worker", peer_timeout_s=120)
    distribute.check_same_on_all_workers(strategy, 6, "the restored step")
    print("agreed on 6", flush=True)
    mine = int(argv[1]) == 0  # worker 1 only
    answers = [distribute.any_worker(strategy, mine), distribute.any_worker(strategy, False)]
    print(f"any_worker {answers}", flush=True)
    distribute.check_same_on_all_workers(strategy, int(argv[1]), "the restored step", "use shared storage")
cli.run(main, user_errors=(distribute.StrategyError,))
"""


def test_workers_agree_on_a_flag_and_all_stop_when_they_restored_different_steps():
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    procs = []
    try:
        for index, value in enumerate((6, 0)):
            tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
            procs.append(subprocess.Popen(
                [sys.executable, "-c", _AGREE, str(value)], cwd=ROOT, env={**ENV, "TF_CONFIG": json.dumps(tf_config)},
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            ))
        outputs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert "agreed on 6" in out and "any_worker [True, False]" in out, err[-3000:]
        assert p.returncode == 2 and "Traceback" not in err, err[-3000:]
        assert [line for line in err.splitlines() if line.startswith("error:")] == [
            "error: the workers of TF_CONFIG disagree on the restored step: worker 0 has 6, worker 1 has 0; "
            "use shared storage"
        ]


def _lost(message, error=tf.errors.UnavailableError):
    with pytest.raises(distribute.PeerLostError) as caught:
        with distribute.peer_failures():
            raise error(None, None, message)
    return str(caught.value)


def test_lost_peer_is_named_in_one_line(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", _config())
    # What a survivor gets (TF 2.21, seen in the multi-worker resume test) when its peer is killed ...
    reset = ("Collective ops is aborted by: recvmsg:Connection reset by peer\nAdditional GRPC error information "
             "from remote target /job:worker/replica:0/task:1 while calling /tensorflow.WorkerService/RecvBuf:")
    assert _lost(reset) == (
        "lost worker 1 (127.0.0.1:2223): its connection closed; restart the same command on every host of "
        "TF_CONFIG to resume from the last checkpoint"
    )
    # ... or stops answering (SIGSTOP, a partition) for the heartbeat timeout.
    silent = ("Collective ops is aborted by: Error reported from /job:worker/task:1: The following tasks are "
              "unhealthy (stopped sending heartbeats):\n/job:worker/replica:0/task:1\nThe tasks have crashed.")
    assert _lost(silent, error=tf.errors.InternalError).startswith(
        "lost worker 1 (127.0.0.1:2223): it stopped sending heartbeats;"
    )


def test_workers_out_of_step_are_not_called_lost(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", _config())
    # Seen when only the chief stopped on SIGTERM and saved while the other worker trained on.
    desync = ("{{function_node __wrapped__CollectiveReduceV2_Nordering_token_1_device_/job:worker/replica:0/task:0"
              "/device:CPU:0}} Collective ops is aborted by: Collective instance 1259 expected type 0 and "
              "data_type 9 but got type 0 and data_type 1")
    assert _lost(desync, error=tf.errors.InternalError) == (
        "the workers of TF_CONFIG went out of step (one stopped or resumed at another step); restart the same "
        "command on every host of TF_CONFIG to resume from the last checkpoint"
    )
    other = "Graph execution error:\n\nCollective ops is aborted by: something else\nThe error could be from a..."
    assert _lost(other, error=tf.errors.CancelledError).startswith("lost a worker of TF_CONFIG: something else;")


def test_other_errors_pass_through(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", _config())
    # An Unavailable that names no task (a storage bucket, say) is not a lost peer.
    with pytest.raises(tf.errors.UnavailableError):
        with distribute.peer_failures():
            raise tf.errors.UnavailableError(None, None, "gs://bucket unreachable")
    with pytest.raises(tf.errors.InvalidArgumentError):
        with distribute.peer_failures():
            raise tf.errors.InvalidArgumentError(None, None, "shape mismatch")
    # Outside a multi-worker run nothing is translated.
    with pytest.raises(tf.errors.UnavailableError):
        with distribute.peer_failures(tf.distribute.get_strategy()):
            raise tf.errors.UnavailableError(None, None, "remote target /job:worker/replica:0/task:1")
    monkeypatch.delenv("TF_CONFIG")
    with pytest.raises(tf.errors.UnavailableError):
        with distribute.peer_failures():
            raise tf.errors.UnavailableError(None, None, "Collective ops is aborted by: remote /job:worker/task:1")
