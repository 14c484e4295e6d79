"""What the engine matrix's process groups run besides training cells: one optimizer step on chosen micro-batches
per rank, whose updated weights a test compares with one batch holding every sample in a single process.

The entry (`run_cell`) is what `run_workers` calls on each rank; it is a module-level function so the spawned
ranks can unpickle it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from vray.train.loop import WorkerConfig

Layout = tuple[tuple[tuple[int, ...], ...], ...]  # per rank: its micro-batches, each the indexes of its samples


@dataclass(frozen=True)
class StepProbe:
    """One `Recipe._train_step` on the micro-batches `layout` gives each rank; rank 0 writes the trainable weights
    after the step and the step's logged loss to `out`."""

    config: WorkerConfig
    layout: Layout
    out: str

    def run(self) -> None:
        from vray.train.loop import LocalReporter, Recipe

        recipe = Recipe(self.config, LocalReporter())
        recipe.setup()
        rows = self.config.train.read(sorted({i for rank in self.layout for mb in rank for i in mb}))
        micro = [[recipe.collator.encode(rows[i]) for i in mb] for mb in self.layout[recipe.rank]]
        loss = recipe._train_step(micro)
        weights = trainable_weights(recipe.engine)
        if recipe.rank == 0:
            torch.save({"loss": loss, "weights": weights}, self.out)


def trainable_weights(engine) -> dict[str, torch.Tensor]:
    """Every trainable parameter, whole, on every rank (collective under ZeRO-3 and FSDP2)."""
    named = [(n, p) for n, p in engine.model.named_parameters() if p.requires_grad]
    if engine.name.startswith("zero3"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {n: p.detach().float().cpu().clone() for n, p in named}
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().cpu().clone() for n, p in named}


def run_cell(config) -> None:
    """A training cell (a WorkerConfig) or a probe."""
    if isinstance(config, StepProbe):
        return config.run()
    from vray.train.loop import train_worker

    train_worker(config)


def write_dataset(folder: Path, rows: list[dict]) -> str:
    """A JSONL dataset of `rows` (image paths absolute); its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)
