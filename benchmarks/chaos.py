"""Chaos: one tiny run meets a worker kill, a preemption notice and a 20-second S3 outage, and ends where an
uninterrupted run of the same spec ends.

Everything is on 127.0.0.1: a Ray cluster of a head and two 1-CPU worker nodes (ray.cluster_utils.Cluster, token
authentication on as Ray's default), an S3 endpoint (moto, vray.testing.s3) holding the run directories, and a LoRA
run on tiny:qwen2_5_vl in Float32 with a fixed seed. The reference run goes through uninterrupted; then the same spec
runs again and meets, at fixed points:

1. its worker killed with SIGKILL once the first periodic checkpoint is complete and the run is past it (Ray Train
   restarts the worker, which restores that checkpoint: the steps since are redone);
2. its worker's node drained as preempted (the GCS call `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`
   makes), then removed abruptly once the notice's checkpoint is there (the restart on the other node redoes nothing);
3. the S3 endpoint stopped for 20 s just before a checkpoint (training goes on; the upload waits the outage out).

It records the steps redone, the time lost (wall time against the reference's) and whether every step's loss, the
final one included, equals the reference's (to 1e-6; in fp32 on the CPU it is equal bit for bit). Bounded: each fault
gives up after its own wait, and the whole script after --limit-s seconds.

    python benchmarks/chaos.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import signal
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from results_io import write_result

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BUCKET = "vray-chaos"
TOTAL_STEPS = 240
EVERY = 40  # periodic checkpoints: steps 40, 80, ...
KILL_AFTER = 50  # the worker is killed once a step past this is logged (the step-40 checkpoint is complete)
PREEMPT_AFTER = 100  # the node is drained once a step past this is logged
OUTAGE_AT = 145  # the endpoint stops once a step past this is logged: the step-160 checkpoint meets the outage
OUTAGE_S = 20.0
DEADLINE_S = 30  # the preemption notice's deadline
TOLERANCE = 1e-6


def spec_dict(name: str) -> dict[str, Any]:
    return {"architecture": {"name": "qwen2.5vl", "size": "3B"}, "model": {"source": "tiny:qwen2_5_vl"},
            "trainingMode": {"type": "LoRA"}, "compute": {"precisionType": "Float32"}, "task": "vqa", "seed": 7,
            "data": {"train": f"synthetic:vqa?train={2 * TOTAL_STEPS}&eval=2"},
            "hyperparameters": {"epochs": 1, "learningRate": 1e-3, "batchSize": 2}, "lora": {"dropout": 0.1},
            "evaluation": {"maxNewTokens": 2, "temperature": 0, "repetitionPenalty": 1.0},
            "checkpointing": {"everySteps": EVERY, "keepBest": 1},
            "cluster": {"workers": 1, "maxFailures": 1, "maxPreemptions": 1},
            "output": f"s3://{BUCKET}/runs", "name": name}


class Watcher:
    """Reads the run's metrics log and worker files straight from the endpoint (no listing cache), fault by fault."""

    def __init__(self, run: Any, s3: Any):
        from vray.fs import filesystem

        self.run, self.s3 = run, s3
        self.fs, self.root = filesystem(run.uri)

    def _read(self, rel: str) -> str | None:
        if not self.s3.up:
            return None
        try:
            self.fs.invalidate_cache()
            return self.fs.cat_file(f"{self.root}/{rel}").decode()
        except Exception:  # noqa: BLE001 - not written yet, or the endpoint is down
            return None

    def records(self) -> list[dict[str, Any]]:
        import json

        out = []
        for line in (self._read("metrics.jsonl") or "").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def last_step(self) -> int:
        return max((r["step"] for r in self.records() if "loss" in r), default=0)

    def wait(self, until: Any, timeout_s: float) -> bool:
        give_up = time.monotonic() + timeout_s
        while time.monotonic() < give_up:
            if until():
                return True
            time.sleep(0.1)
        return False

    def complete(self) -> list[int]:
        """Steps whose checkpoint has its marker, read from the endpoint's memory (also while it is away)."""
        import re

        prefix = self.root.split("/", 1)[1] + "/checkpoints/"
        return sorted(int(m.group(1)) for k in self.s3.keys(BUCKET)
                      if (m := re.fullmatch(re.escape(prefix) + r"step-(\d+)/vray_checkpoint\.json", k)))

    def worker(self, what: str) -> str | None:
        text = self._read(f".workers/rank-0.{what}")
        return text.strip() if text else None


def faults(watcher: Watcher, cluster: Any, nodes: list[Any], seen: dict[str, Any]) -> None:
    """The three faults, in order, each at its fixed point; each gives up (recorded) if its point never comes."""
    import ray
    from ray.core.generated import autoscaler_pb2

    def restored(n: int) -> bool:
        return sum(r.get("event") == "restored" for r in watcher.records()) >= n

    # 1. a worker killed with SIGKILL
    if not watcher.wait(lambda: watcher.last_step() > KILL_AFTER, 300):
        seen["kill"] = {"error": f"step {KILL_AFTER} never came"}
        return
    pid = int(watcher.worker("pid"))
    at = watcher.last_step()
    os.kill(pid, signal.SIGKILL)
    seen["kill"] = {"pid": pid, "logged_step_at_kill": at, "at": time.time()}
    if not watcher.wait(lambda: restored(1), 180):
        seen["kill"]["error"] = "no restart after the kill"
        return

    # 2. a preemption notice for the worker's node, then the node's abrupt end
    if not watcher.wait(lambda: watcher.last_step() > PREEMPT_AFTER, 300):
        seen["preemption"] = {"error": f"step {PREEMPT_AFTER} never came"}
        return
    node_id = watcher.worker("node")
    (node,) = [n for n in nodes if n.node_id == node_id]
    deadline_ms = int(time.time() * 1000) + DEADLINE_S * 1000
    ok, why = ray._raylet.GcsClient(address=cluster.address).drain_node(
        node_id, autoscaler_pb2.DRAIN_NODE_REASON_PREEMPTION, "vray chaos: spot reclaim", deadline_ms)
    seen["preemption"] = {"node": node_id, "drained": ok, "why": why, "logged_step_at_drain": watcher.last_step(),
                          "at": time.time()}
    noticed = watcher.wait(lambda: any(r.get("event") == "preemption" for r in watcher.records()), DEADLINE_S)
    seen["preemption"]["checkpointed_before_deadline"] = noticed
    cluster.remove_node(node, allow_graceful=False)
    if not watcher.wait(lambda: restored(2), 180):
        seen["preemption"]["error"] = "no restart after the preemption"
        return

    # 3. the endpoint away for OUTAGE_S, from just before a checkpoint
    if not watcher.wait(lambda: watcher.last_step() > OUTAGE_AT, 300):
        seen["outage"] = {"error": f"step {OUTAGE_AT} never came"}
        return
    start_step = watcher.last_step()
    watcher.s3.stop()
    began = time.time()
    print(f"chaos: S3 endpoint stopped at {began:.1f} (logged step {start_step})", file=sys.stderr, flush=True)
    before = watcher.complete()
    time.sleep(OUTAGE_S)
    at_end = watcher.complete()
    watcher.s3.start()
    ended = time.time()
    print(f"chaos: S3 endpoint back at {ended:.1f}", file=sys.stderr, flush=True)
    # the checkpoint that met the outage completes once the endpoint is back
    completed = watcher.wait(lambda: bool(set(watcher.complete()) - set(at_end)), 60)
    seen["outage"] = {"seconds": round(ended - began, 2), "logged_step_at_start": start_step,
                      "complete_checkpoints_at_start": before, "complete_checkpoints_at_end": at_end,
                      "new_checkpoint_complete_after_s": round(time.time() - ended, 2) if completed else None,
                      "complete_checkpoints_after": watcher.complete(), "began": began, "ended": ended}


def prepared_run(name: str) -> Any:
    from vray.spec import validate_spec
    from vray.train.prepare import prepare

    return prepare(validate_spec(spec_dict(name)))


def train(prepared: Any, console_out: io.StringIO) -> tuple[Any, float]:
    from rich.console import Console

    from vray.train.launcher import run_training

    began = time.monotonic()
    run_training(prepared, Console(file=console_out))
    return prepared.run, time.monotonic() - began


def losses(run: Any) -> dict[int, float]:
    """Each step's logged loss; a step logged twice would show as a count mismatch (checked below)."""
    return {r["step"]: r["loss"] for r in run.read_metrics() if "loss" in r}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--limit-s", type=float, default=1200, help="the whole script's bound")
    args = parser.parse_args()

    def out_of_time(*_: Any) -> None:
        raise TimeoutError(f"the chaos benchmark ran past --limit-s {args.limit_s:g}")

    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(int(args.limit_s))

    work = Path(tempfile.mkdtemp(prefix="vray-chaos-"))
    token = work / "auth_token"
    token.write_text(uuid.uuid4().hex)
    # Ray's default for a head: token authentication, with this benchmark's own token; the notice poll made faster
    # than Ray Train's 5 s, and the metrics log uploaded every half second, so the faults land where they are meant
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), VRAY_CACHE=str(work / "cache"),
                      RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S="0.5", VRAY_METRICS_UPLOAD_S="0.5",
                      TOKENIZERS_PARALLELISM="false")
    os.environ.pop("RAY_ADDRESS", None)

    import ray
    from ray.cluster_utils import Cluster

    from vray.cluster import connect
    from vray.testing.s3 import local_s3

    result: dict[str, Any] = {"benchmark": "chaos", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
                              "settings": {"total_steps": TOTAL_STEPS, "checkpoint_every": EVERY,
                                           "kill_after_step": KILL_AFTER, "preempt_after_step": PREEMPT_AFTER,
                                           "outage_after_step": OUTAGE_AT, "outage_s": OUTAGE_S,
                                           "precision": "Float32", "mode": "LoRA (dropout 0.1)",
                                           "model": "tiny:qwen2_5_vl", "seed": 7, "tolerance": TOLERANCE}}
    cluster = None
    try:
        with local_s3(BUCKET) as s3:
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
            nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
            cluster.wait_for_nodes()
            connect(cluster.address, log_to_driver=False)

            reference, reference_s = train(prepared_run("reference"), io.StringIO())
            result["reference"] = {"wall_s": round(reference_s, 2)}

            chaos_prepared = prepared_run("chaos")
            chaos_run = chaos_prepared.run
            seen: dict[str, Any] = {}
            injector = threading.Thread(target=faults, args=(Watcher(chaos_run, s3), cluster, nodes, seen), daemon=True)
            injector.start()
            log = io.StringIO()
            chaos, chaos_s = train(chaos_prepared, log)
            injector.join(timeout=OUTAGE_S + 60)
            if not s3.up:
                s3.start()

            want, got = losses(reference), losses(chaos)
            records = chaos.read_metrics()
            steps = [r["step"] for r in records if "loss" in r]
            restores = [r for r in records if r.get("event") == "restored"]
            notices = [r for r in records if r.get("event") == "preemption"]
            diffs = [abs(got[s] - want[s]) for s in want if s in got]
            outage = seen.get("outage", {})
            during = [r["step"] for r in records if "loss" in r and outage.get("began", 1e30) <= r["time"]
                      <= outage.get("ended", 0)]
            for fault in seen.values():
                fault.pop("at", None)
            seen.get("outage", {}).pop("began", None)
            seen.get("outage", {}).pop("ended", None)
            result["faults"] = seen
            result["chaos"] = {
                "wall_s": round(chaos_s, 2),
                "restores": [{"step": r["step"], "redone_steps": r.get("redone_steps")} for r in restores],
                "preemption_notice": notices[0] if notices else None,
                "steps_trained_during_outage": len(during),
                "steps_logged_once": steps == list(range(1, TOTAL_STEPS + 1)),
                "final_step": max(steps, default=0),
                "final_checkpoint": chaos.exists("final/vray_checkpoint.json"),
                "checkpoints": [s for s, _ in chaos.complete_checkpoints()],
            }
            result["steps_redone"] = sum(r.get("redone_steps") or 0 for r in restores)
            result["time_lost_s"] = round(chaos_s - reference_s, 2)
            result["final_loss"] = {"reference": want.get(TOTAL_STEPS), "chaos": got.get(TOTAL_STEPS),
                                    "abs_diff": abs(want[TOTAL_STEPS] - got[TOTAL_STEPS])
                                    if TOTAL_STEPS in want and TOTAL_STEPS in got else None}
            result["max_abs_loss_diff_all_steps"] = max(diffs, default=None)
            result["exact"] = bool(diffs) and len(diffs) == TOTAL_STEPS and max(diffs) <= TOLERANCE \
                and result["chaos"]["steps_logged_once"] and all("error" not in f for f in seen.values()) \
                and len(seen) == 3 and seen["outage"].get("new_checkpoint_complete_after_s") is not None
    finally:
        signal.alarm(0)
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
    write_result(args.out, "chaos", result, echo=True)
    return 0 if result.get("exact") else 1


if __name__ == "__main__":
    sys.exit(main())
