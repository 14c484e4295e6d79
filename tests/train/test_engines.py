"""The engine coverage matrix: every family, every engine, every mode, as plain gloo process groups (no Ray).

Each family trains under at least one sharded engine, each engine trains at least two families, and each mode
(LoRA, QLoRA, full) trains under every engine that supports it (QLoRA: ddp, whose 4-bit base is replicated).
One process group runs the cells in turn (a failing cell fails alone); each cell's held-out loss must fall.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from vray.spec import validate_spec
from vray.storage.rundir import RunDir
from vray.train.local import RunOutcome, run_workers
from vray.train.prepare import prepare, worker_config, write_run_files

pytestmark = pytest.mark.slow

FAMILY_ARCH = {
    "qwen2_5_vl": ("qwen2.5vl", "3B"), "qwen3_vl": ("qwen3vl", "2B"), "qwen3_vl_moe": ("qwen3vl", "30B-A3B"),
    "qwen3_5": ("qwen3.5", "0.8B"), "qwen3_5_moe": ("qwen3.5", "35B-A3B"), "internvl": ("internvl3.5", "8B"),
}


@dataclass(frozen=True)
class Cell:
    family: str
    strategy: str
    mode: str  # lora | qlora | full | lora-experts
    world: int = 2

    @property
    def id(self) -> str:
        return f"{self.family}-{self.strategy}-{self.mode}"


CELLS = [
    Cell("qwen2_5_vl", "ddp", "lora"),
    Cell("qwen2_5_vl", "ddp", "qlora"),
    Cell("qwen3_vl", "ddp", "full"),
    Cell("qwen3_vl_moe", "ddp", "lora-experts"),
    Cell("qwen2_5_vl", "zero1", "full"),
    Cell("internvl", "zero1", "lora"),
    Cell("qwen3_vl", "zero2", "lora"),
    Cell("qwen3_5", "zero2", "full"),
    Cell("qwen3_vl_moe", "zero3", "lora"),
    Cell("internvl", "zero3", "full"),
    Cell("qwen3_5_moe", "zero3-offload", "lora"),
    Cell("qwen2_5_vl", "zero3-offload", "full"),
    Cell("qwen3_5", "fsdp2", "lora"),
    Cell("qwen3_5_moe", "fsdp2", "full"),
    Cell("qwen3_vl_moe", "fsdp2-hybrid", "full", world=4),
    Cell("internvl", "fsdp2-hybrid", "lora", world=4),
]


def _spec(cell: Cell, output: str) -> dict:
    name, size = FAMILY_ARCH[cell.family]
    return {
        "architecture": {"name": name, "size": size}, "model": {"source": f"tiny:{cell.family}"},
        "trainingMode": {"type": "Full" if cell.mode == "full" else "LoRA"},
        "quantization": {"enabled": cell.mode == "qlora"}, "compute": {"precisionType": "BFloat16"},
        "task": "vqa", "data": {"train": "synthetic:vqa?train=32&eval=8"},
        "hyperparameters": {"epochs": 1, "learningRate": 3e-3, "batchSize": 8},
        "lora": {"dropout": 0.0, "experts": cell.mode == "lora-experts"},
        "evaluation": {"maxNewTokens": 2, "temperature": 0, "repetitionPenalty": 1.0},
        "cluster": {"workers": cell.world, "strategy": cell.strategy}, "output": output, "name": cell.id,
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, tuple[RunDir, RunOutcome]]:
    """Every cell trained, with how it ended: the 2-process cells in one process group, the 4-process ones in
    another. A cell that fails is recorded and the group carries on with the next (in fresh processes), so one
    cell's failure fails that cell alone."""
    out = str(tmp_path_factory.mktemp("engines"))
    runs: dict[str, tuple[RunDir, RunOutcome]] = {}
    for world in (2, 4):
        cells = [c for c in CELLS if c.world == world]
        configs, dirs = [], []
        for cell in cells:
            prepared = prepare(validate_spec(_spec(cell, out)))
            write_run_files(prepared)
            configs.append(worker_config(prepared, rows_in=f"{out}/rows/{cell.id}"))
            dirs.append(prepared.run)
        outcomes = run_workers(configs, world, keep_going=True)
        runs.update({cell.id: (run, outcome) for cell, run, outcome in zip(cells, dirs, outcomes)})
    return runs


def test_the_matrix_covers_families_engines_and_modes():
    from vray.spec import STRATEGIES

    sharded = {c.family for c in CELLS if c.strategy != "ddp"}
    assert sharded == set(FAMILY_ARCH)
    for engine in STRATEGIES:
        assert len({c.family for c in CELLS if c.strategy == engine}) >= 2, engine
        assert {"full"} <= {c.mode for c in CELLS if c.strategy == engine}
        assert {c.mode for c in CELLS if c.strategy == engine} & {"lora", "lora-experts"}
    assert any(c.mode == "qlora" and c.strategy == "ddp" for c in CELLS)


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.id)
def test_cell_trains_with_its_engine_and_the_loss_falls(trained, cell):
    run, outcome = trained[cell.id]
    if not outcome.ok:
        pytest.fail(f"{cell.id} failed:\n{outcome.report()}", pytrace=False)
    records = run.read_metrics()
    start = next(r for r in records if r.get("event") == "start")
    assert start["strategy"] == cell.strategy and start["workers"] == cell.world
    evals = [r for r in records if "eval/loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == start["total_steps"]
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"], [r["eval/loss"] for r in evals]
    assert evals[-1]["eval/samples"] == 8  # every held-out sample scored once, whatever the sharding
    assert run.latest_checkpoint() is not None and (run.final / "vray_checkpoint.json").exists()
    weights = "adapter_model.safetensors" if cell.mode != "full" else "model.safetensors"
    assert (run.final / weights).exists()
