"""The input of a TPU pod or a multi-worker cluster (distribute.per_host_dataset): one pipeline per
host, each reading its own shard of the examples, the global batch split evenly over the replicas.

Under MultiWorkerMirroredStrategy with 2 local worker processes (one replica each), as a pod's
hosts would run; and on one host with 2 replicas (MirroredStrategy on the 2 logical CPUs of
conftest)."""

from __future__ import annotations

import json

import numpy as np

from moco_tf.data import pipelines, sources
from moco_tf.training import distribute
from tests.support.helpers import run_local_workers

GLOBAL_BATCH, STEPS = 32, 3

WORKER = r"""
import json, sys
from moco_tf.data import pipelines, sources
from moco_tf.training import distribute

out, batch_size, n_steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
strategy = distribute.make_strategy("multi_worker", peer_timeout_s=120)
source = sources.make_source("digits")
contexts = []

def dataset_fn(context):
    contexts.append([context.input_pipeline_id, context.num_input_pipelines, context.num_replicas_in_sync,
                     context.get_per_replica_batch_size(batch_size)])
    return pipelines.pretrain_dataset(source, source.pretrain_split, 32, "v2", batch_size, 5, context)

iterator = iter(distribute.per_host_dataset(strategy, dataset_fn))
steps = []
for _ in range(n_steps):
    batch = next(iterator)
    steps.append({
        "ids": [r.numpy().tolist() for r in strategy.experimental_local_results(batch["ids"])],
        "views": [list(r.shape) for r in strategy.experimental_local_results(batch["views"])],
    })
json.dump({"contexts": contexts, "replicas": strategy.num_replicas_in_sync, "steps": steps}, open(out, "w"))
"""


def test_one_pipeline_per_worker_reads_disjoint_shards_at_global_over_replicas(tmp_path):
    outputs = [str(tmp_path / f"worker{i}.json") for i in range(2)]
    results = run_local_workers(
        [["-c", WORKER, outputs[i], str(GLOBAL_BATCH), str(STEPS)] for i in range(2)], timeout=300
    )
    for code, _, err in results:
        assert code == 0, err[-3000:]
    seen = [json.load(open(path)) for path in outputs]
    per_replica = GLOBAL_BATCH // 2
    for worker, got in enumerate(seen):
        assert got["replicas"] == 2
        # One pipeline on this host, its own of 2, batching global / replicas examples per replica.
        assert got["contexts"] == [[worker, 2, 2, per_replica]], got["contexts"]
        for step in got["steps"]:
            assert step["views"] == [[per_replica, 2, 32, 32, 3]]  # one local replica
            (ids,) = step["ids"]
            assert len(ids) == per_replica
            # Pipeline p reads examples p, p + 2, p + 4, ...: its shard.
            assert all(i % 2 == worker for i in ids), (worker, ids)
        ids = [i for step in got["steps"] for i in step["ids"][0]]
        assert len(set(ids)) == len(ids) == STEPS * per_replica  # no example twice within the epoch
    # Each step's global batch: both hosts' examples, none of them on both.
    for a, b in zip(seen[0]["steps"], seen[1]["steps"], strict=True):
        assert not set(a["ids"][0]) & set(b["ids"][0])


def test_one_host_with_two_replicas_is_one_pipeline_split_per_replica():
    strategy = distribute.mirrored()
    assert strategy.num_replicas_in_sync == 2
    source = sources.make_source("digits")
    contexts = []

    def dataset_fn(context):
        contexts.append((context.input_pipeline_id, context.num_input_pipelines, context.num_replicas_in_sync))
        return pipelines.pretrain_dataset(
            source, source.pretrain_split, 32, "v2", GLOBAL_BATCH, 5, context
        )

    batch = next(iter(distribute.per_host_dataset(strategy, dataset_fn)))
    assert contexts == [(0, 1, 2)]
    ids = [r.numpy() for r in strategy.experimental_local_results(batch["ids"])]
    assert [len(r) for r in ids] == [GLOBAL_BATCH // 2] * 2
    assert len(set(np.concatenate(ids).tolist())) == GLOBAL_BATCH  # the two replicas' examples differ
