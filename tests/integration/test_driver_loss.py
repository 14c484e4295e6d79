"""Driver loss: `vray train` killed with SIGKILL mid-run resumes with `vray train --resume RUN_DIR` at the exact step,
each step logged once; a submitted job whose driver dies is reported failed, with the command that resumes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from vray.storage.rundir import RunDir

pytestmark = pytest.mark.slow

STEPS = 24  # 96 rows, batch 4, one epoch


# jobs/tiny-cpu.yaml made longer, with a checkpoint every 2 steps and keepBest 1: retention removes checkpoints
# while the run goes on (the ones Ray Train's run snapshot used to list)
OVERRIDES = {"name": "driver-job", "hyperparameters.epochs": "1", "hyperparameters.batchSize": "4",
             "data.train": "synthetic:vqa?train=96&eval=2", "evaluation.maxNewTokens": "1",
             "checkpointing.everySteps": "2", "checkpointing.keepBest": "1"}


def _vray(env: dict[str, str], *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("vray")), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


@pytest.mark.timeout(600)
def test_a_job_whose_driver_dies_is_failed_and_resumes_at_the_exact_step(dashboard_head, vray_cache, monkeypatch):
    from ray.job_submission import JobSubmissionClient

    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # the job client would prefer it to the address it is given
    address, env, runs = dashboard_head["address"], dashboard_head["env"], dashboard_head["runs"]
    job_env = {"VRAY_STORAGE": str(runs), "VRAY_CACHE": str(vray_cache), "PATH": env["PATH"]}
    sets = [a for k, v in OVERRIDES.items() for a in ("--set", f"{k}={v}")]
    submitted = _vray(env, "submit", "jobs/tiny-cpu.yaml", "--address", address, "--submission-id", "driver-1",
                      "--no-wait", *sets, *[a for k, v in job_env.items() for a in ("--env", f"{k}={v}")])
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    token = (Path(env["HOME"]) / ".ray" / "auth_token").read_text().strip()
    jobs = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
    run = RunDir.of(runs / "driver-job")

    killed_at = None
    deadline = time.time() + 300
    while time.time() < deadline and killed_at is None:
        info = jobs.get_job_info("driver-1")
        assert str(info.status).rsplit(".", 1)[-1] in ("PENDING", "RUNNING"), jobs.get_job_logs("driver-1")[-3000:]
        steps = [r["step"] for r in run.read_metrics() if "loss" in r]
        if info.driver_info and run.complete_checkpoints() and steps and max(steps) >= 10:
            os.kill(int(info.driver_info.pid), signal.SIGKILL)  # the job's driver: `vray train` on the head
            killed_at = max(steps)
        time.sleep(0.05)
    assert killed_at is not None and killed_at < STEPS, f"not killed mid-run: {jobs.get_job_logs('driver-1')[-3000:]}"
    while time.time() < deadline and str(jobs.get_job_status("driver-1")).rsplit(".", 1)[-1] not in (
            "FAILED", "STOPPED", "SUCCEEDED"):
        time.sleep(0.5)

    status = _vray(env, "jobs", "status", "driver-1", "--address", address)
    assert status.stdout.strip() == "FAILED", status.stdout + status.stderr
    resume = f"vray submit --resume {run.root} --address {address}"
    assert resume in status.stderr and f"vray train --resume {run.root}" in status.stderr, status.stderr
    assert not (run.final / "vray_checkpoint.json").exists()
    # Ray Train is told of no checkpoint: retention can delete any without breaking a later fit() of the run
    snapshot = run.root / "checkpoint_manager_snapshot.json"
    assert not snapshot.exists() or json.loads(snapshot.read_text())["checkpoint_results"] == []
    last = run.complete_checkpoints()[-1][0]
    # a run directory of an older vray: Ray's snapshot lists a checkpoint retention has deleted; --resume drops it
    import ray

    gone = {"version": 0, "checkpoint_dir_name": "checkpoints/step-2-deleted", "metrics": {"step": 2}}
    snapshot.write_text(json.dumps({
        "ray_version": ray.__version__, "checkpoint_results": [gone], "checkpoint_report_indices": [0],
        "latest_checkpoint_result": gone, "pending_training_results": [], "pending_validation_specs": [],
        "current_report_index": 1, "validated_checkpoint_dir_names": [],
        "timed_out_validation_checkpoint_dir_names": [], "failed_validation_checkpoint_dir_names": []}))

    # `vray train --resume RUN_DIR` from this shell, on the same cluster
    resumed = _vray({**env, "RAY_ADDRESS": dashboard_head["gcs"], "VRAY_CACHE": str(vray_cache)},
                    "train", "--resume", str(run.root))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert resumed.stdout.strip().splitlines()[-1] == str(run.root)
    records = run.read_metrics()
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, STEPS + 1))  # the uninterrupted run's final step, every step logged once
    (restored,) = [r for r in records if r.get("event") == "restored"]
    assert restored["step"] >= last and restored["step"] % 2 == 0
    assert (restored["samples_consumed"], restored["epoch"]) == (4 * restored["step"], 0)
    evals = [r["step"] for r in records if "eval/loss" in r]
    assert evals == sorted(set(evals))  # each evaluation once too
    assert json.loads((run.final / "vray_checkpoint.json").read_text())["step"] == STEPS
