"""The hub unreachable and nothing cached (HF_HUB_OFFLINE=1, an empty HF_HOME), for a registry model: the commands
that only read the shipped configs work; the ones that load the model refuse it in one line, before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, run_cli

HUB_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"

# Each command in the same fresh, offline process (one interpreter start for all of them), as `vray` runs it.
COMMANDS = """
import sys
from vray.cli import app
for args in {commands!r}:
    print("=== " + " ".join(args), flush=True)
    print("=== " + " ".join(args), file=sys.stderr, flush=True)
    app(args, standalone_mode=False)
"""


@pytest.fixture
def offline(tmp_path):
    """The environment of a machine without the hub: HF_HUB_OFFLINE=1 and an empty Hugging Face cache."""
    home = tmp_path / "hf"
    home.mkdir()
    return {"HF_HUB_OFFLINE": "1", "HF_HOME": str(home)}


def _rows(path, n: int) -> None:
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": f"r{i}", "task": "vqa", "conversation": [
                {"role": "user", "text": f"question {i}?"}, {"role": "assistant", "text": "an answer"}]}) + "\n")


def test_commands_that_need_no_weights_work_offline(tmp_path, offline):
    _rows(tmp_path / "data.jsonl", 3)
    (tmp_path / "llava.json").write_text(json.dumps([{"id": "1", "conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]))
    commands = [
        ["archs"],
        ["plan", "jobs/qwen2.5-vl-7b-lora.yaml"],
        ["plan", "--table"],
        ["data", "check", str(tmp_path / "data.jsonl"), "--arch", "qwen2.5vl", "--no-ray", "--no-cache"],
        ["data", "convert", str(tmp_path / "llava.json"), "--from", "llava", "--to", str(tmp_path / "converted")],
        ["k8s", "render", "jobs/qwen2.5-vl-7b-lora.yaml", "--out", str(tmp_path / "k8s")],
    ]
    proc = subprocess.run([sys.executable, "-c", COMMANDS.format(commands=commands)], capture_output=True, text=True,
                          timeout=600, cwd=REPO, env={**os.environ, **offline})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = {block.split("\n", 1)[0]: block for block in proc.stdout.split("=== ")[1:]}
    err = {block.split("\n", 1)[0]: block for block in proc.stderr.split("=== ")[1:]}
    assert "Qwen2.5-VL-7B-Instruct" in out["archs"]
    assert "plan: ddp on 1 GPU(s)" in out["plan jobs/qwen2.5-vl-7b-lora.yaml"]
    assert "qwen2.5vl" in out["plan --table"]
    check = " ".join(commands[3])
    assert "3 valid, 0 error(s)" in out[check] and "(estimated)" in out[check]
    assert "token counts are estimated" in err[check] and "HF_HUB_OFFLINE" in err[check]
    assert (tmp_path / "converted" / "data.jsonl").exists()
    assert sorted(p.name for p in (tmp_path / "k8s").iterdir()) == ["raycluster.yaml", "rayjob.yaml", "rayservice.yaml"]
    assert not any((tmp_path / "hf").iterdir())  # nothing was fetched, nothing cached


def _refused(proc: subprocess.CompletedProcess) -> str:
    """The one error line of a command that refused the missing model (no traceback)."""
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    line = errors[0]
    assert HUB_MODEL in line and "not in the Hugging Face cache" in line and "HF_HUB_OFFLINE" in line
    assert "folder" in line and "HF_TOKEN" in line
    return line


@pytest.mark.slow
def test_commands_that_load_the_model_refuse_it_before_any_work(tmp_path, offline, ray_head):
    from vray.testing.runs import write_adapter_run

    run = write_adapter_run(tmp_path / "runs", "on-hub-base", model={"source": HUB_MODEL})
    _rows(tmp_path / "data.jsonl", 3)
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"architecture: {{name: qwen2.5vl, size: 3B}}\ntrainingMode: {{type: LoRA}}\ntask: vqa\n"
                    f"name: offline\ndata: {{train: {tmp_path / 'data.jsonl'}}}\noutput: {tmp_path / 'out'}\n")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    train = run_cli("train", str(spec), env=offline, timeout=300)  # checked in a task on the session's cluster
    assert "model.source" in _refused(train) and "checking" not in train.stderr  # before the data check
    assert "s3://" in _refused(run_cli("eval", run.uri, "--data", str(tmp_path / "data.jsonl"), env=offline))
    assert "spec.yaml" in _refused(run_cli("export", run.uri, "--merge", "--out", str(tmp_path / "merged"),
                                           env=offline))
    serve = run_cli("serve", run.uri, "--port", "0", env=offline, timeout=300)
    assert "base model of run on-hub-base" in _refused(serve) and "deploying" not in serve.stderr
    assert "give that folder" in _refused(run_cli("serve", HUB_MODEL, "--port", "0", env=offline, timeout=300))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no run directory, no export


def _cached_snapshot(home, repo_id: str) -> None:
    """`repo_id` as the Hugging Face cache under `home` holds a downloaded snapshot (its files are stand-ins)."""
    commit = "0" * 40
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors").write_bytes(b"")


@pytest.mark.slow
def test_the_model_is_checked_with_what_a_worker_sees(tmp_path, offline, ray_head):
    """A driver without the model does not refuse a cluster whose workers have it: the check runs in a Ray task,
    in the environment the workers get (here, a cache only they are pointed at)."""
    import ray

    from vray.cluster import connect, on_a_worker
    from vray.errors import VrayError
    from vray.models.loader import require_source

    if not ray.is_initialized():
        connect(ray_head, log_to_driver=False)
    workers_cache = tmp_path / "workers-hf"
    _cached_snapshot(workers_cache, HUB_MODEL)
    assert on_a_worker(require_source, HUB_MODEL, env={**offline, "HF_HOME": str(workers_cache)}) is None
    with pytest.raises(VrayError, match=f"model.source: {HUB_MODEL} is not in the Hugging Face cache") as refused:
        on_a_worker(require_source, HUB_MODEL, env=offline)
    assert type(refused.value) is VrayError and "Traceback" not in str(refused.value)  # as itself, not Ray's wrapper
