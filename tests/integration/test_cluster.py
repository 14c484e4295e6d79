"""Cluster operations: multi-node runs need shared storage, weights are fetched once per node, and `ray job submit` /
`vray submit` run jobs/tiny-cpu.yaml on a real head with its dashboard on 127.0.0.1."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, agent_ports, run_cli, stop_cluster
from vray.cluster import free_port
from vray.errors import VrayError


def test_training_a_multi_node_plan_needs_shared_storage(tmp_path, monkeypatch):
    from vray.spec import validate_spec
    from vray.train.prepare import prepare

    raw = {"architecture": {"name": "qwen3vl", "size": "32B"}, "model": {"source": "tiny:qwen3_vl"},
           "trainingMode": {"type": "Full"}, "hyperparameters": {"batchSize": 16}, "task": "vqa",
           "data": {"train": "synthetic:vqa?train=16&eval=4"},
           "cluster": {"gpu": "A100-40GB", "gpusPerNode": 8}, "output": str(tmp_path), "name": "multi"}
    with pytest.raises(VrayError, match="spans 2 nodes but the run directory .* node-local"):
        prepare(validate_spec(raw))
    monkeypatch.setenv("VRAY_SHARED_STORAGE", "1")
    assert prepare(validate_spec(raw)).plan.nodes == 2


def _resolve(args: tuple[str, str]) -> int:
    uri, cache = args
    from pathlib import Path

    from vray.models import loader

    loader.resolve_source(uri, cache_dir=Path(cache))
    return loader.FETCHES


def test_model_weights_are_fetched_once_per_node(s3_endpoint, tmp_path):
    import fsspec

    from vray.models.loader import resolve_source

    local = resolve_source("tiny:qwen2_5_vl")
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3_endpoint})
    fs.put(str(local) + "/", "vray-test/models/tiny-qwen25/", recursive=True)
    cache = tmp_path / "node-cache"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:  # four workers of one node start at once
        fetched = pool.map(_resolve, [("s3://vray-test/models/tiny-qwen25", str(cache))] * 4)
    assert sum(fetched) == 1
    (folder,) = [p for p in (cache / "models").iterdir() if p.is_dir()]
    assert (folder / "config.json").exists()


# ---- ray job submit against a real head --------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard_head(tmp_path_factory, vray_cache):
    """`ray start --head` with its dashboard (the job API) on 127.0.0.1, stopped at the end."""
    ray_exe = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    port, dashboard = free_port(), free_port()
    temp_dir = tmp_path_factory.mktemp("ray-jobs")
    runs = tmp_path_factory.mktemp("job-runs")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([ray_exe, "start", "--head", f"--port={port}", "--num-cpus=4", "--node-ip-address=127.0.0.1",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                    "--disable-usage-stats", f"--temp-dir={temp_dir}", *agent_ports()], check=True, capture_output=True,
                   text=True,
                   env=env)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    import httpx

    while time.time() < deadline:
        try:
            if httpx.get(f"{address}/api/version", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    try:
        yield {"address": address, "runs": runs, "env": env}
    finally:
        stop_cluster(temp_dir)


def _job_env(head) -> dict[str, str]:
    return {"VRAY_STORAGE": str(head["runs"]), "VRAY_CACHE": os.environ["VRAY_CACHE"]}


@pytest.mark.timeout(600)
def test_ray_job_submit_trains_the_tiny_job(dashboard_head):
    ray_exe = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    env = {**dashboard_head["env"], "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    runtime_env = {"env_vars": {**_job_env(dashboard_head), "PATH": env["PATH"]}}
    proc = subprocess.run(
        [ray_exe, "job", "submit", "--address", dashboard_head["address"], "--submission-id", "tiny-cpu-1",
         "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--",
         "vray", "train", "jobs/tiny-cpu.yaml", "--set", "name=submitted", "--set", "hyperparameters.epochs=1",
         "--set", "data.train=synthetic:vqa?train=32&eval=8"],
        capture_output=True, text=True, timeout=540, env=env, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = subprocess.run([ray_exe, "job", "status", "--address", dashboard_head["address"], "tiny-cpu-1"],
                            capture_output=True, text=True, env=env)
    assert "tiny-cpu-1' succeeded" in status.stdout, status.stdout + status.stderr
    run = dashboard_head["runs"] / "submitted"
    steps = sorted(run.glob("checkpoints/step-*/vray_checkpoint.json"))
    assert steps and (run / "final" / "vray_checkpoint.json").exists()


@pytest.mark.timeout(600)
def test_vray_submit_follows_the_job_and_vray_jobs_inspects_and_stops(dashboard_head):
    address = dashboard_head["address"]
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    sets = ["--set", "hyperparameters.epochs=1", "--set", "data.train=synthetic:vqa?train=16&eval=4"]
    job_env = [a for k, v in {**_job_env(dashboard_head), **env}.items() for a in ("--env", f"{k}={v}")]
    proc = run_cli("submit", "jobs/tiny-cpu.yaml", "--address", address, "--submission-id", "vray-submit-1",
                   "--set", "name=via-vray", *sets, *job_env, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0] == "vray-submit-1"
    assert "step" in proc.stdout  # the job's own progress, followed live
    assert (dashboard_head["runs"] / "via-vray" / "final" / "vray_checkpoint.json").exists()
    status = run_cli("jobs", "status", "vray-submit-1", "--address", address)
    assert status.stdout.strip() == "SUCCEEDED"
    logs = run_cli("jobs", "logs", "vray-submit-1", "--address", address)
    assert "via-vray" in logs.stdout
    # a job stopped while it runs
    proc = run_cli("submit", "jobs/tiny-cpu.yaml", "--address", address, "--submission-id", "vray-stop-1",
                   "--no-wait", "--set", "name=stopped", *sets, *job_env)
    assert proc.returncode == 0, proc.stderr
    stop = run_cli("jobs", "stop", "vray-stop-1", "--address", address)
    assert stop.stdout.strip() == "STOPPED", stop.stdout + stop.stderr
    missing = run_cli("submit", str(REPO.parent / "elsewhere.yaml"), "--address", address)
    assert missing.returncode == 1 and "no such spec file" in missing.stderr
