"""Checkpoints that survive failures: resume continues the loss exactly; Ray Train restarts a killed worker."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from vray.spec import validate_spec
from vray.storage.rundir import RunDir
from vray.train.launcher import run_training, train_processes
from vray.train.prepare import PreparedRun, prepare

pytestmark = pytest.mark.slow


def _spec(out: Path, name: str, strategy: str, mode: str = "LoRA", train: int = 32, batch: int = 8, every: int = 2,
          epochs: int = 2) -> dict:
    return {"architecture": {"name": "qwen2.5vl", "size": "3B"}, "model": {"source": "tiny:qwen2_5_vl"},
            "trainingMode": {"type": mode}, "compute": {"precisionType": "BFloat16"}, "task": "vqa",
            "data": {"train": f"synthetic:vqa?train={train}&eval=4"},
            "hyperparameters": {"epochs": epochs, "learningRate": 3e-3, "batchSize": batch}, "lora": {"dropout": 0.0},
            "evaluation": {"maxNewTokens": 2, "temperature": 0, "repetitionPenalty": 1.0},
            "checkpointing": {"everySteps": every, "keepBest": 10},
            "cluster": {"workers": 2, "strategy": strategy}, "output": str(out), "name": name}


@pytest.mark.parametrize(("strategy", "mode"), [("zero2", "LoRA"), ("fsdp2", "Full")])
def test_resumed_run_continues_the_loss(tmp_path, strategy, mode):
    prepared = prepare(validate_spec(_spec(tmp_path, "orig", strategy, mode)))
    run = train_processes(prepared)
    original = {r["step"]: r["loss"] for r in run.read_metrics() if "loss" in r}
    assert sorted(original) == list(range(1, 9))
    copy = tmp_path / "copy"
    shutil.copytree(run.root, copy, symlinks=True)
    for step in (6, 8):
        shutil.rmtree(copy / "checkpoints" / f"step-{step}")
    shutil.rmtree(copy / "final")
    resumed = PreparedRun(prepared.spec.model_copy(update={"name": "copy"}), prepared.plan, RunDir.of(copy),
                          prepared.train_path, prepared.eval_path, prepared.data)
    train_processes(resumed, resume_from=copy / "checkpoints" / "step-4")
    records = RunDir.of(copy).read_metrics()
    after = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(after) == list(range(1, 9))  # every step once: 1-4 from before, 5-8 resumed
    for step in range(5, 9):  # weights, optimizer, scheduler and data position restored: the same losses
        assert after[step] == pytest.approx(original[step], rel=1e-3)
    (restored,) = [r for r in records if r.get("event") == "restored"]
    assert (restored["step"], restored["epoch"], restored["samples_consumed"]) == (4, 1, 32)


@pytest.mark.timeout(900)
def test_ray_train_restarts_a_killed_worker_from_the_last_checkpoint(ray_head, tmp_path):
    spec = validate_spec(_spec(tmp_path, "killed", "ddp", train=96, batch=4, every=6, epochs=1))
    prepared = prepare(spec)
    run = prepared.run
    killed: dict[str, int] = {}

    def kill_rank_1_after_a_checkpoint() -> None:
        deadline = time.time() + 600
        while time.time() < deadline:
            steps = [r["step"] for r in run.read_metrics() if "loss" in r]
            if run.complete_checkpoints() and steps and 6 < max(steps) < 20:
                pid = int((run.root / ".workers" / "rank-1.pid").read_text())
                os.kill(pid, signal.SIGKILL)
                killed.update(pid=pid, at=max(steps))
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_rank_1_after_a_checkpoint, daemon=True)
    watcher.start()
    run_training(prepared, Console(file=io.StringIO()), max_failures=1)
    watcher.join(timeout=5)
    assert killed, "the worker was not killed mid-run"
    records = run.read_metrics()
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 25))  # the right final step, no step twice, none skipped
    restored = [r for r in records if r.get("event") == "restored"]
    assert len(restored) == 1 and restored[0]["step"] % 6 == 0 and restored[0]["step"] <= killed["at"]
    assert int((run.root / ".workers" / "rank-1.pid").read_text()) != killed["pid"]  # a new worker process
    assert json.loads((run.final / "vray_checkpoint.json").read_text())["step"] == 24
