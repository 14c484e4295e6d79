"""Cluster operations: multi-node runs need shared storage, weights are fetched once per node, and `ray job submit` /
`vray submit` run jobs/tiny-cpu.yaml on a real head with its dashboard on 127.0.0.1."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, start_user_head, stop_cluster, user_env
from vray.errors import VrayError


def test_training_a_multi_node_plan_needs_shared_storage(tmp_path, monkeypatch):
    from vray.spec import validate_spec
    from vray.train.prepare import prepare

    raw = {"architecture": {"name": "qwen3vl", "size": "32B"}, "model": {"source": "tiny:qwen3_vl"},
           "trainingMode": {"type": "Full"}, "hyperparameters": {"batchSize": 16}, "task": "vqa",
           "data": {"train": "synthetic:vqa?train=16&eval=4"},
           "cluster": {"gpu": "A100-40GB", "gpusPerNode": 8, "workers": 16}, "output": str(tmp_path), "name": "multi"}
    # Sized from its (tiny) data the run would fit one node; 16 workers make it span two.
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


# ---- ray job submit against a real head, started as a user starts one --------------------------------------------


def _job_env(head) -> dict[str, str]:
    return {"VRAY_STORAGE": str(head["runs"]), "VRAY_CACHE": os.environ["VRAY_CACHE"]}


def _vray(env: dict[str, str], *args: str, timeout: float = 540) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("vray")), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


TINY = ["--set", "hyperparameters.epochs=1", "--set", "data.train=synthetic:vqa?train=16&eval=4"]


@pytest.mark.timeout(600)
def test_ray_job_submit_trains_the_tiny_job(dashboard_head):
    ray_exe = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    env = {**dashboard_head["env"], "RAY_AUTH_MODE": "token"}  # Ray's own CLI sends the token only when told to
    runtime_env = {"env_vars": {**_job_env(dashboard_head), "PATH": env["PATH"]}}
    refused = subprocess.run([ray_exe, "job", "list", "--address", dashboard_head["address"]], capture_output=True,
                             text=True, env=dashboard_head["env"], timeout=120)
    assert refused.returncode != 0 and "authentication token" in (refused.stdout + refused.stderr).lower()
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
def test_vray_submit_follows_the_job_and_vray_jobs_inspects_and_stops(dashboard_head, monkeypatch):
    """The user's shell, nothing exported: vray finds ~/.ray/auth_token and the job API accepts it."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # Ray's job client below would prefer it to the address it is given
    address, env = dashboard_head["address"], dashboard_head["env"]
    job_env = [a for k, v in {**_job_env(dashboard_head), "PATH": env["PATH"]}.items() for a in ("--env", f"{k}={v}")]
    proc = _vray(env, "submit", "jobs/tiny-cpu.yaml", "--address", address, "--submission-id", "vray-submit-1",
                 "--set", "name=via-vray", *TINY, *job_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0] == "vray-submit-1"
    assert "step" in proc.stdout  # the job's own progress, followed live
    assert not re.search(r"\bINFO\b", proc.stderr), proc.stderr[-2000:]  # Ray's job SDK, quiet
    assert (dashboard_head["runs"] / "via-vray" / "final" / "vray_checkpoint.json").exists()
    status = _vray(env, "jobs", "status", "vray-submit-1", "--address", address)
    assert status.stdout.strip() == "SUCCEEDED"
    logs = _vray(env, "jobs", "logs", "vray-submit-1", "--address", address)
    assert "via-vray" in logs.stdout
    # the token travelled in the request headers only, never in what the cluster stores about the job
    token = (Path(env["HOME"]) / ".ray" / "auth_token").read_text().strip()
    from ray.job_submission import JobSubmissionClient

    info = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"}).get_job_info("vray-submit-1")
    assert token not in json.dumps(info.runtime_env) and "RAY_AUTH" not in json.dumps(info.runtime_env)
    sneaked = _vray(env, "submit", "jobs/tiny-cpu.yaml", "--address", address, "--env", f"RAY_AUTH_TOKEN={token}")
    assert sneaked.returncode == 1 and "never puts the Ray token there" in sneaked.stderr
    # a job stopped while it runs
    proc = _vray(env, "submit", "jobs/tiny-cpu.yaml", "--address", address, "--submission-id", "vray-stop-1",
                 "--no-wait", "--set", "name=stopped", *TINY, *job_env)
    assert proc.returncode == 0, proc.stderr
    stop = _vray(env, "jobs", "stop", "vray-stop-1", "--address", address)
    assert stop.stdout.strip() == "STOPPED", stop.stdout + stop.stderr
    missing = _vray(env, "submit", str(REPO.parent / "elsewhere.yaml"), "--address", address)
    assert missing.returncode == 1 and "no such spec file" in missing.stderr
    # another user's shell (no token of theirs): one line naming what to do, no traceback
    stranger = _vray(user_env(Path(env["HOME"]) / "elsewhere"), "jobs", "list", "--address", address)
    assert stranger.returncode == 1 and "Traceback" not in stranger.stderr
    assert "ray get-auth-token" in stranger.stderr and "RAY_AUTH_MODE=token" in stranger.stderr


@pytest.mark.timeout(600)
def test_vray_train_joins_a_token_auth_head_with_nothing_exported(dashboard_head, tmp_path):
    env = {**dashboard_head["env"], "RAY_ADDRESS": dashboard_head["gcs"], "VRAY_CACHE": os.environ["VRAY_CACHE"]}
    proc = _vray(env, "train", "jobs/tiny-cpu.yaml", "--output", str(tmp_path), "--set", "name=joined", *TINY)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "joined" / "final" / "vray_checkpoint.json").exists()
    # without the token: vray's one line, after Ray's own wait for the head
    stranger = {**user_env(tmp_path / "stranger"), "RAY_ADDRESS": dashboard_head["gcs"]}
    refused = _vray(stranger, "train", "jobs/tiny-cpu.yaml", "--output", str(tmp_path), "--set", "name=refused", *TINY)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert f"could not join the Ray cluster at {dashboard_head['gcs']}" in refused.stderr
    assert "RAY_AUTH_MODE=token" in refused.stderr and "ray get-auth-token" in refused.stderr


@pytest.mark.timeout(600)
def test_a_head_without_authentication_trains_and_takes_jobs(tmp_path_factory, vray_cache):
    """A user without a token (an empty HOME): `ray start --head` leaves authentication off, and both vray commands
    work with nothing exported; a shell that has a token joins it all the same."""
    home = tmp_path_factory.mktemp("empty-home")
    env = user_env(home)
    temp_dir = tmp_path_factory.mktemp("ray-open")
    runs = tmp_path_factory.mktemp("open-runs")
    head = start_user_head(temp_dir, env)
    try:
        assert "Token authentication is disabled" in head["started"]
        train = _vray({**env, "RAY_ADDRESS": head["gcs"]}, "train", "jobs/tiny-cpu.yaml", "--output", str(runs),
                      "--set", "name=open-train", *TINY)
        assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
        job_env = [a for k, v in {"VRAY_STORAGE": str(runs), "VRAY_CACHE": os.environ["VRAY_CACHE"],
                                  "PATH": env["PATH"]}.items() for a in ("--env", f"{k}={v}")]
        submit = _vray(env, "submit", "jobs/tiny-cpu.yaml", "--address", head["address"], "--set", "name=open-job",
                       *TINY, *job_env)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert not (home / ".ray" / "auth_token").exists()  # vray made no token for the user
        for name in ("open-train", "open-job"):
            assert (runs / name / "final" / "vray_checkpoint.json").exists()
        listed = _vray({**env, "RAY_AUTH_TOKEN": "a-token-the-head-does-not-ask-for"}, "jobs", "list",
                       "--address", head["address"])
        assert listed.returncode == 0 and "open-job" in listed.stdout, listed.stdout + listed.stderr
    finally:
        stop_cluster(temp_dir)
