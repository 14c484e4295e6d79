"""Checkpoints that survive failures: resume continues the loss exactly (every rank's random streams, LoRA dropout
on), also at another world size; checkpoints are lean; Ray Train restarts a killed worker."""

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
          epochs: int = 2, workers: int = 2) -> dict:
    return {"architecture": {"name": "qwen2.5vl", "size": "3B"}, "model": {"source": "tiny:qwen2_5_vl"},
            "trainingMode": {"type": mode}, "compute": {"precisionType": "BFloat16"}, "task": "vqa",
            "data": {"train": f"synthetic:vqa?train={train}&eval=4"},
            "hyperparameters": {"epochs": epochs, "learningRate": 3e-3, "batchSize": batch}, "lora": {"dropout": 0.1},
            "evaluation": {"maxNewTokens": 2, "temperature": 0, "repetitionPenalty": 1.0},
            "checkpointing": {"everySteps": every, "keepBest": 10},
            "cluster": {"workers": workers, "strategy": strategy}, "output": str(out), "name": name}


STATE_FILES = ("dcp", "deepspeed", "optimizer.pt", "lora_optimizer.pt", "adapter_model.safetensors")


def _state_bytes(folder: Path) -> int:
    """Bytes of a checkpoint's weights and optimizer states (not the processor's files)."""
    return sum(f.stat().st_size for name in STATE_FILES for f in ([folder / name] if (folder / name).is_file()
                                                                  else (folder / name).rglob("*")) if f.is_file())


def _assert_lean_lora(run: RunDir, folder: Path) -> None:
    """A LoRA checkpoint holds the adapter and its optimizer states, never the frozen base: its bytes are bounded
    by the adapter's fp32 bytes times (weights + two Adam moments), three times over (DeepSpeed keeps its own
    files and a world-size-independent copy), plus the fixed overhead of small files."""
    start = next(r for r in run.read_metrics() if r.get("event") == "start")
    adapter = 4 * start["trainable_params"]
    assert 0 < _state_bytes(folder) <= 3 * (1 + 2) * adapter + 256 * 1024, (_state_bytes(folder), adapter)
    assert (folder / "adapter_model.safetensors").exists()
    stored = _stored_weight_names(folder)
    assert stored and all("lora_" in name for name in stored), [n for n in stored if "lora_" not in n][:3]


def _stored_weight_names(folder: Path) -> list[str]:
    """The weights an engine's own resume files hold: DeepSpeed's module states, or DCP's model entries."""
    import torch

    if (folder / "dcp").exists():
        from torch.distributed.checkpoint import FileSystemReader

        entries = FileSystemReader(str(folder / "dcp")).read_metadata().state_dict_metadata
        return [k for k in entries if k.startswith("model.")]
    states = folder / "deepspeed" / "state" / "mp_rank_00_model_states.pt"
    if states.exists():
        return list(torch.load(states, map_location="cpu", weights_only=False)["module"])
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return list(f.keys())


def _resume_at(prepared: PreparedRun, source: Path, name: str, workers: int) -> RunDir:
    """Continue the run `prepared` from checkpoint `source` with `workers` ranks, in a run directory `name`."""
    spec = prepared.spec.model_copy(update={"name": name, "cluster": prepared.spec.cluster.model_copy(
        update={"workers": workers})})
    again = prepare(spec)
    train_processes(again, resume_from=source)
    return again.run


@pytest.mark.timeout(1500)
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
    step4 = run.root / "checkpoints" / "step-4"
    assert sorted(p.name for p in step4.glob("rng-rank*.pt")) == ["rng-rank0.pt", "rng-rank1.pt"]
    assert not (step4 / "model.safetensors").exists()  # Hugging Face weights of the whole model: final/ only
    if mode == "LoRA":
        _assert_lean_lora(run, step4)
    else:
        assert (run.final / "model.safetensors").exists() or (run.final / "model.safetensors.index.json").exists()

    # The same checkpoint resumes at world size 1: DCP reshards, LoRA's states are world-size independent.
    single = _resume_at(prepared, step4, "single", workers=1)
    records = single.read_metrics()
    (restored,) = [r for r in records if r.get("event") == "restored"]
    assert (restored["step"], restored["saved_world_size"]) == (4, 2)
    assert sorted(r["step"] for r in records if "loss" in r) == list(range(5, 9))
    assert (single.final / "vray_checkpoint.json").exists()
    # Its first step trains the restored weights with the restored optimizer: close to the 2-rank run's loss.
    assert records[[i for i, r in enumerate(records) if r.get("step") == 5 and "loss" in r][0]]["loss"] == \
        pytest.approx(original[5], rel=0.05)


def test_lean_checkpoints_and_what_a_world_change_refuses(tmp_path):
    """LoRA checkpoints of ddp and fsdp2 hold the adapter only; a ZeRO full fine-tuning checkpoint refuses another
    world size, naming the universal-checkpoint conversion."""
    from vray.train.local import run_workers
    from vray.train.prepare import worker_config, write_run_files

    preps = [prepare(validate_spec(_spec(tmp_path, f"{s}-{m}", s, m, train=16, epochs=1)))
             for s, m in (("ddp", "LoRA"), ("fsdp2", "LoRA"), ("zero1", "Full"))]
    configs = []
    for prepared in preps:
        write_run_files(prepared)
        configs.append(worker_config(prepared, rows_in=tmp_path / "rows" / prepared.run.name))
    run_workers(configs, 2)
    for prepared in preps[:2]:
        _assert_lean_lora(prepared.run, prepared.run.root / "checkpoints" / "step-2")
    full = preps[2]
    with pytest.raises(RuntimeError, match="ds_to_universal"):
        _resume_at(full, full.run.root / "checkpoints" / "step-2", "zero1-at-1", workers=1)


@pytest.mark.timeout(900)
def test_ray_train_restarts_a_killed_worker_from_the_last_checkpoint(ray_head, tmp_path):
    spec = _spec(tmp_path, "killed", "ddp", train=96, batch=4, every=6, epochs=1)
    spec["cluster"]["maxFailures"] = 1  # the spec's failure budget reaches Ray Train
    prepared = prepare(validate_spec(spec))
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
    run_training(prepared, Console(file=io.StringIO()))
    watcher.join(timeout=5)
    assert killed, "the worker was not killed mid-run"
    records = run.read_metrics()
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 25))  # the right final step, no step twice, none skipped
    restored = [r for r in records if r.get("event") == "restored"]
    assert len(restored) == 1 and restored[0]["step"] % 6 == 0 and restored[0]["step"] <= killed["at"]
    assert int((run.root / ".workers" / "rank-1.pid").read_text()) != killed["pid"]  # a new worker process
    assert json.loads((run.final / "vray_checkpoint.json").read_text())["step"] == 24
