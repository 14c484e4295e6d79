"""Preemption without Ray: the loop asks its reporter once a step; on a notice it checkpoints the step just finished,
logs the notice and stops without final/; a resume continues from that step. The spec's preemption settings reach
Ray Train's FailureConfig, and the driver never takes a run that stopped early for a finished one."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from vray.errors import VrayError
from vray.spec import DEFAULT_MAX_PREEMPTIONS, validate_spec
from vray.train import launcher
from vray.train.loop import LocalReporter, train_worker
from vray.train.prepare import prepare, worker_config, write_run_files


def _spec(tmp_path: Path, name: str = "notice") -> dict:
    return {"architecture": {"name": "qwen2.5vl", "size": "3B"}, "model": {"source": "tiny:qwen2_5_vl"},
            "compute": {"precisionType": "Float32"}, "task": "vqa", "seed": 3,
            "data": {"train": "synthetic:vqa?train=16&eval=2"},
            "hyperparameters": {"epochs": 1, "learningRate": 1e-3, "batchSize": 2},
            "evaluation": {"maxNewTokens": 2, "temperature": 0, "repetitionPenalty": 1.0},
            "checkpointing": {"everySteps": 100, "keepBest": 1},
            "cluster": {"workers": 1}, "output": str(tmp_path), "name": name}


class NoticeAt(LocalReporter):
    """A reporter whose cluster says, after step `at`, that a node goes away."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.asked = at, 0

    def preempted(self):
        self.asked += 1
        return {"deadline": None, "nodes": ["n1"], "ranks": [0]} if self.asked >= self.at else None


def test_a_notice_checkpoints_the_step_just_finished_and_a_resume_continues_from_it(tmp_path):
    prepared = prepare(validate_spec(_spec(tmp_path)))
    run = prepared.run
    write_run_files(prepared)
    with tempfile.TemporaryDirectory() as rows:
        config = worker_config(prepared, rows_in=rows)
        reporter = NoticeAt(3)
        train_worker(config, reporter)
        assert reporter.asked == 3  # once a step, the notice after the third
        assert [s for s, _ in run.complete_checkpoints()] == [3] and not run.final.exists()
        records = run.read_metrics()
        (notice,) = [r for r in records if r.get("event") == "preemption"]
        assert (notice["step"], notice["checkpoint"], notice["nodes"], notice["samples_consumed"]) == \
            (3, "checkpoints/step-3", ["n1"], 6)
        assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]

        train_worker(config, LocalReporter(run.latest_checkpoint()))
    records = run.read_metrics()
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))  # 16 samples / 2 a step
    (restored,) = [r for r in records if r.get("event") == "restored"]
    assert (restored["step"], restored["samples_consumed"]) == (3, 6)
    assert (run.final / "vray_checkpoint.json").exists()


def test_the_driver_refuses_a_run_that_stopped_before_its_last_step(tmp_path, monkeypatch):
    prepared = prepare(validate_spec(_spec(tmp_path, "stopped")))
    monkeypatch.setattr(launcher, "ensure_ray", lambda verbose=False: None)
    monkeypatch.setattr(launcher, "worker_config", lambda *a, **k: None)  # (its rows would go to Ray's object store)
    monkeypatch.setattr(launcher, "trainer", lambda *a, **k: SimpleNamespace(fit=lambda: None))  # returned, no final/
    with pytest.raises(VrayError, match=r"ended before its last step .*no complete checkpoint yet; continue it with `vray train --resume "):
        launcher.run_training(prepared, Console(file=io.StringIO()))


def test_the_failure_and_preemption_budgets_and_grace_reach_ray_trains_failure_config(tmp_path):
    from vray.plan.planner import cpu_plan
    from vray.storage.rundir import RunDir

    assert validate_spec({}).cluster.maxPreemptions == DEFAULT_MAX_PREEMPTIONS
    assert validate_spec({}).cluster.maxFailures == 0  # Ray Train's default: the first worker failure stops the run
    spec = validate_spec({"cluster": {"maxPreemptions": 0, "preemptionGraceS": 30, "maxFailures": 2}})
    prepared = SimpleNamespace(plan=cpu_plan(spec, 1), spec=spec, run=RunDir.of(str(tmp_path / "run")))
    failure = launcher.trainer(prepared, config=None, max_failures=spec.cluster.maxFailures).run_config.failure_config
    assert (failure.max_failures, failure.max_preemption_failures, failure.preemption_grace_s) == (2, 0, 30)
    for bad, field in (({"maxPreemptions": -1}, "cluster.maxPreemptions"), ({"preemptionGraceS": -1}, "cluster.preemptionGraceS"),
                       ({"maxFailures": -1}, "cluster.maxFailures")):
        with pytest.raises(VrayError, match=field):
            validate_spec({"cluster": bad})
