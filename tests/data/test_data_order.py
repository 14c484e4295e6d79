"""Each rank trains the samples, step by step, that vray at commit 194c2eb gave it: over two epochs, from a
mid-epoch resume, with and without rows the driver's check left out; and the same held-out share.

The reference, tests/fixtures/data_order_194c2eb.json, was written by tests/fixtures/make_data_order_reference.py
run on a checkout of 194c2eb (its worker read the whole file and took its share through DataOrder). Here the
same ids come through today's path: the driver keeps the checked samples (`ReadResult.kept`, as `check_data`
does) and packs them (`SampleRows`), the WorkerConfig carries them, and each rank reads only its own rows
(`WorkerConfig.data`) into the SampleStream.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vray.data import synthetic
from vray.data.io import read_samples
from vray.data.pipeline import SampleRows, SampleStream
from vray.plan.planner import cpu_plan
from vray.spec import validate_spec
from vray.train.loop import WorkerConfig

REFERENCE = json.loads((Path(__file__).parents[1] / "fixtures" / "data_order_194c2eb.json").read_text())


class _IdCollator:
    """Encodes a sample as its id: the stream then yields the ids each step trains."""

    def encode(self, sample):
        return sample.id


def _config(exclude: list[str], rows: Path) -> WorkerConfig:
    ref = REFERENCE
    spec = validate_spec({
        "architecture": {"name": "qwen2.5vl", "size": "3B"}, "trainingMode": {"type": "Full"}, "task": "vqa",
        "data": {"train": ref["dataset"]}, "seed": ref["seed"], "cluster": {"workers": ref["world"]},
        "hyperparameters": {"epochs": ref["epochs"], "batchSize": ref["micro_batch"],
                            "gradientAccumulation": ref["effective_batch"] // ref["micro_batch"]},
    }).resolved()
    plan = cpu_plan(spec)
    assert (plan.effective_batch, plan.micro_batch, plan.num_workers) == (ref["effective_batch"], ref["micro_batch"],
                                                                          ref["world"])
    train, held_out = (str(p) for p in synthetic.split_paths(ref["dataset"]))
    kept = {split: read_samples(path, task="vqa").kept(exclude) for split, path in (("train", train), ("eval", held_out))}
    return WorkerConfig(spec, plan, "unused", *(SampleRows.in_folder(split, kept[split], rows / split)
                                                for split in ("train", "eval")))


@pytest.mark.parametrize("scenario", sorted(REFERENCE["scenarios"]))
def test_every_rank_trains_the_samples_of_194c2eb(scenario, tmp_path):
    expected = REFERENCE["scenarios"][scenario]
    config = _config(expected["exclude_ids"], tmp_path)
    assert len(config.train) == expected["train_samples"] and len(config.eval) == expected["eval_samples"]
    for rank, want in enumerate(expected["ranks"]):
        data = config.data(rank, REFERENCE["world"])
        stream = lambda start: list(SampleStream(data.train, data.order, _IdCollator, use_ray=False)  # noqa: E731
                                    .steps(start, data.total_steps))
        assert stream(0) == want["steps"], f"rank {rank}"
        assert stream(REFERENCE["resume_at"]) == want["resumed"], f"rank {rank}, resumed"
        assert [s.id for s in data.eval] == want["eval"] and [s.id for s in data.eval_filler] == want["eval_filler"]
        # The rank reads exactly the rows it trains on, no other rank's, one epoch at a time.
        reads = []
        real = type(data.train).for_steps
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(type(data.train), "for_steps", lambda self, a, b: reads.append((a, b)) or real(self, a, b))
            assert stream(0) == want["steps"]
        per_epoch = data.order.steps_per_epoch
        assert reads == [(e * per_epoch, (e + 1) * per_epoch) for e in range(REFERENCE["epochs"])]
        for a, b in reads:
            mine = data.train.for_steps(a, b)
            assert set(mine) == {i for step in range(a, b) for i in data.order.step_indexes(step)}
            assert {s.id for s in mine.values()} == {i for step in want["steps"][a:b] for mb in step for i in mb}


def test_in_one_epoch_the_ranks_read_disjoint_halves(tmp_path):
    config = _config([], tmp_path)
    halves = []
    for rank in range(2):
        data = config.data(rank, 2)
        halves.append(data.train.indexes(0, data.order.steps_per_epoch))
    assert not halves[0] & halves[1] and len(halves[0]) == len(halves[1]) == len(config.train) // 2
