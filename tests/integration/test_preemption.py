"""A preemption notice mid-run: the node of the training worker is drained as preempted (the GCS call `ray drain-node
--reason DRAIN_NODE_REASON_PREEMPTION` makes) with a deadline; the worker finishes its step, checkpoints it, logs the
notice and yields; the node dies; Ray Train restarts the group on the other node, which continues from that step."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster
from rich.console import Console

from tests.test_cluster import _loopback_cluster_env
from vray.cluster import connect
from vray.spec import validate_spec
from vray.train.launcher import run_training
from vray.train.prepare import prepare

pytestmark = pytest.mark.slow

TOTAL_STEPS = 120  # a tiny step takes tens of ms: room for the notice (a watcher poll away) to come mid-run
DEADLINE_S = 30  # the notice's deadline, from the drain call: the checkpoint and the node's end come before it


def _spec(out: Path) -> dict:
    return {"architecture": {"name": "qwen2.5vl", "size": "3B"}, "model": {"source": "tiny:qwen2_5_vl"},
            "trainingMode": {"type": "LoRA"}, "compute": {"precisionType": "Float32"}, "task": "vqa", "seed": 7,
            "data": {"train": f"synthetic:vqa?train={2 * TOTAL_STEPS}&eval=2"},
            "hyperparameters": {"epochs": 1, "learningRate": 1e-3, "batchSize": 2},
            "evaluation": {"maxNewTokens": 2, "temperature": 0, "repetitionPenalty": 1.0},
            "checkpointing": {"everySteps": 1000, "keepBest": 1},  # no periodic checkpoint: only the notice's
            "cluster": {"workers": 1, "maxPreemptions": 1},
            "output": str(out), "name": "preempted"}


@pytest.fixture
def two_worker_nodes(monkeypatch):
    """A head that runs no training (0 CPUs: the driver, Ray Train's controller) and two 1-CPU worker nodes: the run's
    one worker goes on one of them, its restart on the other."""
    monkeypatch.setenv("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "0.5")  # the watcher's poll (default 5 s)
    with _loopback_cluster_env(auth_mode="token"):
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        connect(cluster.address, log_to_driver=False)
        try:
            yield cluster, nodes
        finally:
            ray.shutdown()
            cluster.shutdown()


@pytest.mark.timeout(200)
def test_a_preemption_notice_checkpoints_the_step_in_flight_and_the_restart_continues_from_it(two_worker_nodes,
                                                                                          tmp_path):
    from ray.core.generated import autoscaler_pb2

    cluster, nodes = two_worker_nodes
    prepared = prepare(validate_spec(_spec(tmp_path)))
    run = prepared.run
    seen: dict = {}

    def preempt_the_workers_node() -> None:
        give_up = time.time() + 240
        while time.time() < give_up:
            steps = [r["step"] for r in run.read_metrics() if "loss" in r]
            node_file = run.root / ".workers" / "rank-0.node"
            if steps and max(steps) >= 2 and node_file.exists():
                break
            time.sleep(0.05)
        else:
            return
        node_id = node_file.read_text().strip()
        (node,) = [n for n in nodes if n.node_id == node_id]
        deadline_ms = int(time.time() * 1000) + DEADLINE_S * 1000
        ok, why = ray._raylet.GcsClient(address=cluster.address).drain_node(
            node_id, autoscaler_pb2.DRAIN_NODE_REASON_PREEMPTION, "vray test: spot reclaim", deadline_ms)
        seen.update(node=node_id, drained=ok, why=why, at=max(steps))
        while time.time() * 1000 < deadline_ms:
            if any(r.get("event") == "preemption" for r in run.read_metrics()):
                break
            time.sleep(0.05)
        seen["checkpointed_before_deadline"] = time.time() * 1000 < deadline_ms
        # The node goes once its checkpoint is there, abruptly, as a reclaimed instance does: the GCS reports the death
        # of a node drained as preempted as a preemption, which Ray Train charges to the preemption budget (the run
        # has no failure budget). A graceful removal (SIGTERM) would be reported as an ordinary node death.
        cluster.remove_node(node, allow_graceful=False)
        seen["removed_before_deadline"] = time.time() * 1000 < deadline_ms

    preempter = threading.Thread(target=preempt_the_workers_node, daemon=True)
    preempter.start()
    run_training(prepared, Console(file=io.StringIO()))  # maxFailures 0: only the preemption budget may restart it
    preempter.join(timeout=30)
    assert seen.get("drained"), seen
    assert seen.get("removed_before_deadline") and seen["checkpointed_before_deadline"], seen

    records = run.read_metrics()
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, TOTAL_STEPS + 1))  # the exact final step; no step lost, none logged twice
    (notice,) = [r for r in records if r.get("event") == "preemption"]
    assert notice["nodes"] == [seen["node"]] and notice["ranks"] == [0] and notice["deadline"]
    # The notice came mid-run (a watcher poll after the drain) and the step it came after was finished and checkpointed.
    assert seen["at"] <= notice["step"] < TOTAL_STEPS and notice["checkpoint"] == f"checkpoints/step-{notice['step']}"
    (restored,) = [r for r in records if r.get("event") == "restored"]
    assert restored["step"] == notice["step"]
    assert restored["samples_consumed"] == notice["samples_consumed"] == 2 * notice["step"]  # the data position
    assert (run.root / ".workers" / "rank-0.node").read_text().strip() != seen["node"]  # restarted on the other node
    assert (run.final / "vray_checkpoint.json").exists()
