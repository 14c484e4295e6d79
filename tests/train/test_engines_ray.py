"""One Ray Train end-to-end run per engine, on the session's `ray start` head (CPU workers, gloo)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from tests.train.test_engines import FAMILY_ARCH
from vray.spec import STRATEGIES, validate_spec
from vray.train.launcher import run_training
from vray.train.prepare import prepare

pytestmark = pytest.mark.slow

# One family per engine (the 2-process matrix covers the rest without Ray).
FAMILY = {"ddp": "qwen2_5_vl", "zero1": "internvl", "zero2": "qwen3_vl", "zero3": "qwen3_5",
          "zero3-offload": "qwen3_vl_moe", "fsdp2": "qwen3_5_moe", "fsdp2-hybrid": "qwen2_5_vl"}


@pytest.mark.timeout(1200)
def test_every_engine_runs_under_ray_train(ray_head, tmp_path):
    assert set(FAMILY) == set(STRATEGIES)
    for strategy, family in FAMILY.items():
        name, size = FAMILY_ARCH[family]
        workers = 4 if strategy == "fsdp2-hybrid" else 2
        spec = validate_spec({
            "architecture": {"name": name, "size": size}, "model": {"source": f"tiny:{family}"},
            "trainingMode": {"type": "Full" if strategy in ("zero3", "fsdp2") else "LoRA"},
            "compute": {"precisionType": "BFloat16"}, "task": "vqa", "data": {"train": "synthetic:vqa?train=16&eval=4"},
            "hyperparameters": {"epochs": 1, "learningRate": 3e-3, "batchSize": 8}, "lora": {"dropout": 0.0},
            "evaluation": {"maxNewTokens": 2, "temperature": 0, "repetitionPenalty": 1.0},
            "cluster": {"workers": workers, "strategy": strategy}, "output": str(tmp_path), "name": strategy,
        })
        run = run_training(prepare(spec), Console(file=io.StringIO()))
        records = run.read_metrics()
        start = next(r for r in records if r.get("event") == "start")
        assert (start["strategy"], start["workers"]) == (strategy, workers)
        assert [s for s, _ in run.complete_checkpoints()] == [start["total_steps"]]
        assert run.best_checkpoint() is not None and (run.final / "vray_checkpoint.json").exists()
