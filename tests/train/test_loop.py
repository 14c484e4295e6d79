"""The per-worker recipe in a plain process (no Ray): run directory contract, learning, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from vray.errors import DataError, VrayError
from vray.plan.plan import Plan
from vray.plan.planner import cpu_plan, split_batch
from vray.spec import validate_spec
from vray.storage.rundir import CHECKPOINT_MARKER
from vray.train.launcher import train_local
from vray.train.prepare import prepare

SMALL = "synthetic:vqa?train=48&eval=16"


def _spec(tmp_path: Path, **over) -> dict:
    base = {
        "architecture": {"name": "qwen2.5vl", "size": "3B"}, "model": {"source": "tiny:qwen2_5_vl"},
        "compute": {"precisionType": "Float32"}, "task": "vqa", "data": {"train": SMALL},
        "hyperparameters": {"epochs": 3, "learningRate": 3e-3, "batchSize": 8},
        "evaluation": {"maxNewTokens": 4, "temperature": 0, "repetitionPenalty": 1.0},
        "cluster": {"workers": 2}, "output": str(tmp_path / "runs"), "name": "unit",
        "checkpointing": {"keepBest": 5},
    }
    for key, value in over.items():
        base[key] = value
    return base


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    prepared = prepare(validate_spec(_spec(tmp)))
    run = train_local(prepared)
    return prepared, run


def test_run_directory_contract(trained):
    prepared, run = trained
    assert run.root == Path(prepared.spec.output) / "unit"
    spec = yaml.safe_load(run.spec.read_text())
    assert spec["name"] == "unit" and spec["model"]["source"] == "tiny:qwen2_5_vl" and spec["systemPrompt"]
    plan = json.loads(run.plan.read_text())
    assert plan["strategy"] == "ddp" and plan["micro_batch"] * plan["grad_accum"] * plan["num_workers"] == 8
    steps = [s for s, _ in run.complete_checkpoints()]
    assert steps == [6, 12, 18]  # 48 samples / 8 per step = 6 steps an epoch
    for _, folder in run.complete_checkpoints():
        assert (folder / CHECKPOINT_MARKER).exists() and (folder / "adapter_model.safetensors").exists()
        assert (folder / "training_state.pt").exists() and (folder / "tokenizer.json").exists()
    assert not [p for p in run.checkpoints.iterdir() if p.name.startswith(".")]  # no half-written checkpoint left
    assert run.best.is_symlink() and run.best_checkpoint() in [f for _, f in run.complete_checkpoints()]
    assert (run.final / "adapter_config.json").exists() and (run.final / "processor_config.json").exists()
    assert run.curves.exists() and run.curves.stat().st_size > 10_000


def test_checkpoints_beyond_the_latest_and_the_best_n_are_removed(tmp_path):
    spec = validate_spec(_spec(tmp_path, checkpointing={"keepBest": 1, "everySteps": 3},
                               hyperparameters={"epochs": 2, "learningRate": 3e-3, "batchSize": 8}))
    run = train_local(prepare(spec))
    evals = {r["step"]: r["eval/exact_match"] for r in run.read_metrics() if "eval/exact_match" in r and r["step"]}
    assert sorted(evals) == [3, 6, 9, 12]  # every 3 steps (and at the end)
    kept = [s for s, _ in run.complete_checkpoints()]
    best = max(evals, key=lambda k: (evals[k], -k))
    assert kept == sorted({12, best})
    assert run.best_checkpoint().name == f"step-{best}"


def test_metrics_show_learning_and_best_is_the_best(trained):
    _, run = trained
    records = run.read_metrics()
    start = next(r for r in records if r.get("event") == "start")
    assert start["total_steps"] == 18 and start["trainable_params"] < start["total_params"]
    assert [r["path"] for r in records if r.get("event") == "loss_head"] == ["chunked"]  # logged once: label-only
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 18
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    evals = [r for r in records if "eval/exact_match" in r]
    assert [r["step"] for r in evals] == [0, 6, 12, 18]
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    best_step = int(run.best_checkpoint().name.split("-")[1])
    best_value = max(r["eval/exact_match"] for r in evals if r["step"] > 0)
    first_best = min(r["step"] for r in evals if r["step"] > 0 and r["eval/exact_match"] == best_value)
    assert best_step == first_best


def test_final_adapter_loads_with_peft(trained):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from vray.models.tiny import tiny_checkpoint

    _, run = trained
    base = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint("qwen2_5_vl"))
    model = PeftModel.from_pretrained(base, run.final)
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_resume_continues_from_the_checkpoint(trained, tmp_path):
    import shutil

    from vray.train.prepare import PreparedRun

    prepared, run = trained
    # Copy the run, drop everything after step 6, and resume: the steps continue at 7 with the same schedule.
    copy = tmp_path / "unit"
    shutil.copytree(run.root, copy, symlinks=True)
    for step in (12, 18):
        shutil.rmtree(copy / "checkpoints" / f"step-{step}")
    shutil.rmtree(copy / "final")
    lines = [json.loads(x) for x in (copy / "metrics.jsonl").read_text().splitlines()]
    (copy / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines if r.get("step", 0) <= 6))
    from vray.storage.rundir import RunDir

    resumed = PreparedRun(prepared.spec.model_copy(update={"output": str(tmp_path)}), prepared.plan, RunDir(copy),
                          prepared.train_path, prepared.eval_path, prepared.data)
    train_local(resumed, resume_from=copy / "checkpoints" / "step-6")
    after = [r for r in RunDir(copy).read_metrics() if "loss" in r]
    assert [r["step"] for r in after] == list(range(1, 19))
    original = {r["step"]: r for r in run.read_metrics() if "loss" in r}
    for r in after:
        assert r["lr"] == pytest.approx(original[r["step"]]["lr"])
    # Same data order and state: the resumed losses retrace the original run.
    assert after[6]["loss"] == pytest.approx(original[7]["loss"], rel=1e-3)


def test_batch_is_split_over_workers_preserving_the_effective_batch():
    assert split_batch(8, 2) == (4, 1)
    assert split_batch(16, 2, max_micro=4) == (4, 2)
    with pytest.raises(VrayError, match="does not split over 3 workers"):
        split_batch(8, 3)
    plan = cpu_plan(validate_spec({"hyperparameters": {"batchSize": 4, "gradientAccumulation": 4}, "cluster": {"workers": 2}}))
    assert (plan.micro_batch, plan.grad_accum, plan.num_workers) == (4, 2, 2)
    assert Plan.from_dict(plan.to_dict()) == plan


def test_cpu_refuses_what_it_cannot_do():
    with pytest.raises(VrayError, match="Float16 training needs a GPU"):
        cpu_plan(validate_spec({"compute": {"precisionType": "Float16"}}))
    with pytest.raises(VrayError, match="quantization.enabled: 4-bit .* replicated, not sharded"):
        cpu_plan(validate_spec({"quantization": {"enabled": True}, "cluster": {"strategy": "zero3"}}))
    assert cpu_plan(validate_spec({"quantization": {"enabled": True}})).strategy == "ddp"  # QLoRA on CPU: ddp


def test_bad_data_fails_before_any_work(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"id": "x", "task": "vqa", "conversation": [{"role": "user", "text": "q"}]}\n')
    with pytest.raises(DataError, match="data.jsonl:1:"):
        prepare(validate_spec(_spec(tmp_path, data={"train": str(data)})))
    assert not (tmp_path / "runs").exists()


def test_existing_run_directory_is_not_overwritten(trained):
    prepared, _ = trained
    with pytest.raises(VrayError, match="already exists"):
        prepare(prepared.spec)


def test_gpu_runs_are_planned_from_the_cluster_block(tmp_path, monkeypatch):
    from vray.errors import PlanError
    from vray.train import prepare as preparing

    # A hub-sized checkpoint is planned, not loaded: the check that it can be loaded has tests of its own.
    monkeypatch.setattr(preparing, "require_model", lambda spec, use_ray=False: None)

    prepared = prepare(validate_spec(_spec(tmp_path, cluster={"gpu": "A100-80GB", "gpusPerNode": 8})))
    plan = prepared.plan
    assert plan.device == "gpu" and plan.fits and plan.strategy == "ddp" and plan.gpu == "A100-80GB"
    assert plan.scaling_config["use_gpu"] and plan.scaling_config["resources_per_worker"]["GPU"] == 1
    with pytest.raises(PlanError) as exc:
        prepare(validate_spec(_spec(tmp_path, architecture={"name": "qwen3vl", "size": "235B-A22B"},
                                    model={"source": None}, trainingMode={"type": "Full"},
                                    cluster={"gpu": "T4-16GB", "nodes": 1})))
    assert exc.value.exit_code == 2 and "what would fit" in str(exc.value)
