"""Packed training steps: the micro-batch assembly, and ranks with different numbers of packed rows.

A packed step packs the rank's samples of the step into rows of at most `pack_tokens` tokens; every rank runs as
many micro-batches as the rank with the most, the others adding fillers that add no loss and no gradient. On two
gloo ranks whose samples pack into two rows and one, the step completes under DDP and FSDP2 and takes the same
step as one padded batch of all the samples in a single process.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.train.probes import StepProbe, run_cell
from tests.train.test_engines import _probe_dataset, _probe_reference, _probe_spec
from vray.data.collate import IGNORE_INDEX, pack_in_order
from vray.data.io import read_jsonl
from vray.spec import validate_spec
from vray.train.local import run_workers
from vray.train.loop import CollatorFactory, Recipe, pack_budget
from vray.train.prepare import prepare, worker_config, write_run_files

LAYOUT = (((0,), (2,)), ((1,), (3,)))  # rank 0: the two longer samples, rank 1: the two shorter ones


def _budget(spec, rows_per_rank: tuple[int, int]) -> int:
    """A row budget under which rank 0's and rank 1's samples pack into `rows_per_rank` rows: (2, 1), or (1, 1)."""
    collator = CollatorFactory.of(spec)()
    encoded = [collator.encode(s) for s in read_jsonl(spec.data.train)]
    lengths = [e.length for e in encoded]
    visual = [e.has_visual for e in encoded]
    extra = collator.vision_dummy().length
    budget = max(max(lengths), lengths[1] + lengths[3])
    if rows_per_rank == (1, 1):
        budget = max(lengths[0] + lengths[2], lengths[1] + lengths[3]) + extra
    rows = [pack_in_order([lengths[i] for i in (a, b)], budget, [visual[a], visual[b]], extra)
            for a, b in ((0, 2), (1, 3))]
    assert tuple(len(r) for r in rows) == rows_per_rank  # the premise
    return budget


# ddp and fsdp2: one rank packs two rows, the other one (and adds a filler). zero2: one row each, fewer micro-batches
# than DeepSpeed's gradient_accumulation_steps (2): the step still ends, and updates, where the loop says.
@pytest.mark.parametrize("strategy,rows", [("ddp", (2, 1)), ("fsdp2", (2, 1)), ("zero2", (1, 1))])
def test_ranks_with_different_packed_row_counts_take_the_padded_step(tmp_path, strategy, rows):
    out = str(tmp_path)
    data = _probe_dataset(tmp_path / "data")
    spec = _probe_spec(strategy, data, out)
    spec["name"] = f"pack-{strategy}"
    prepared = prepare(validate_spec(spec))
    write_run_files(prepared)
    packed = prepared.spec.model_copy(update={"data": prepared.spec.data.model_copy(
        update={"packTokens": _budget(prepared.spec, rows)})})
    config = replace(worker_config(prepared, rows_in=f"{out}/rows"), spec=packed)
    probe = StepProbe(config, LAYOUT, str(prepared.run.root / "probe.pt"))
    [outcome] = run_workers([probe], 2, keep_going=True, entry=run_cell, timeout_s=300)
    assert outcome.ok, outcome.report()
    reference, _, loss = _probe_reference(prepared.run)
    got = torch.load(Path(probe.out), weights_only=False)
    assert abs(got["loss"] - loss) < 1e-5
    worst = max(float((got["weights"][n] - reference[n]).abs().max()) for n in reference)
    assert worst < 1e-5, worst


class _Collator:
    """Stands in for the collator: rows are the samples' lengths, a filler is marked as such."""

    def vision_dummy(self):
        return _Encoded(2, True, "dummy")

    def with_vision(self, encoded):
        return encoded

    def pack(self, encoded, positions):
        labels = torch.full((1, sum(e.length for e in encoded)), IGNORE_INDEX if encoded[0].sample_id == "dummy" else 1)
        return {"labels": labels, "ids": [e.sample_id for e in encoded]}


class _Encoded:
    def __init__(self, length: int, has_visual: bool, sample_id: str):
        self.length, self.has_visual, self.sample_id = length, has_visual, sample_id


def test_the_assembly_packs_in_order_and_pads_to_the_ranks_count(monkeypatch):
    recipe = Recipe.__new__(Recipe)
    recipe.collator, recipe.positions, recipe.device, recipe.pack_tokens = _Collator(), None, torch.device("cpu"), 10
    recipe.pack_strict = True  # data.packTokens set by the user
    micro = [[_Encoded(6, True, "a"), _Encoded(3, False, "b")], [_Encoded(4, False, "c"), _Encoded(5, True, "d")]]
    monkeypatch.setattr("vray.train.loop.all_reduce_max", lambda value, device: max(value, 4))  # another rank: 4
    batches, real = recipe._micro_batches(micro)
    assert real == 2 and [b["ids"] for b in batches] == [["a", "b"], ["c", "d"], ["dummy"], ["dummy"]]
    assert all(bool((b["labels"] == IGNORE_INDEX).all()) for b in batches[real:])  # fillers score nothing
    assert batches[2] is not batches[3]  # each filler its own dict (the step pops its labels)
    recipe.pack_tokens = 8
    with pytest.raises(Exception, match="sample 'a' is 9 tokens"):
        recipe._micro_batches([[_Encoded(9, True, "a")]])
    recipe.pack_strict = False  # a row the planner derived: the longer sample trains in a row of its own
    batches, real = recipe._micro_batches([[_Encoded(9, True, "a"), _Encoded(3, True, "b")]])
    assert real == 2 and [b["ids"] for b in batches[:2]] == [["a"], ["b"]]


def test_the_row_budget_follows_the_spec_then_the_plan():
    from types import SimpleNamespace as NS

    def spec(pack):
        return NS(data=NS(packTokens=pack))

    assert pack_budget(spec(None), NS(pack_tokens=4096)) == 4096
    assert pack_budget(spec(0), NS(pack_tokens=4096)) is None  # 0: padded micro-batches
    assert pack_budget(spec(512), NS(pack_tokens=None)) == 512
    assert pack_budget(spec(None), NS(pack_tokens=None)) is None
