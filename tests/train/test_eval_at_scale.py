"""Evaluation on 2 gloo ranks where it used to hang or gather too much: an eval set smaller than the world (a rank
with nothing to evaluate), held-out data mixing image and text-only samples under sharded engines, the sample cap,
the evaluation's own batch size, and the whole-model gather of sharded engines (once per evaluation) against the
layer-by-layer path (`synced`).

One process group runs the cells in turn; a hang fails the test at its timeout instead of blocking the suite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vray.data.synthetic import materialize
from vray.spec import validate_spec
from vray.train.local import run_workers
from vray.train.prepare import prepare, worker_config, write_run_files

pytestmark = pytest.mark.slow

CELLS = {
    # name: (strategy, eval samples, text-only eval samples, evaluation.maxSamples, gather the model for evaluation)
    "ddp-one-sample": ("ddp", 1, (), None, True),
    "zero3-one-sample": ("zero3", 1, (), None, True),
    "fsdp2-mixed-capped": ("fsdp2", 4, (1,), 3, True),
    "fsdp2-one-sample-synced": ("fsdp2", 1, (), None, False),
}
EVAL_BATCH = {"fsdp2-mixed-capped": 2, "fsdp2-one-sample-synced": 2}  # evaluation.batchSize (default: micro-batch, 1)


def entry(config):
    """A rank's run; the `-synced` cells take the layer-by-layer path a GPU takes when the model does not fit."""
    from vray.train import loop

    if config.spec.name.endswith("-synced"):
        loop.Recipe._gather_for_eval = lambda self: False
    return loop.train_worker(config)


def _data(folder: Path, evals: int, text_only: tuple[int, ...]) -> tuple[str, str]:
    """train.jsonl (4 samples with images) and eval.jsonl (`evals` samples; those in `text_only` without an image)."""
    source = materialize("synthetic:vqa?train=8&eval=8")
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for split, count in (("train", 4), ("eval", evals)):
        rows = [json.loads(line) for line in (source / f"{split}.jsonl").read_text().splitlines()[:count]]
        for i, row in enumerate(rows):
            row["images"] = [str(source / rel) for rel in row["images"]]
            if split == "eval" and i in text_only:
                row["images"] = []
                row["conversation"][0]["text"] = "Which colour comes after red in a rainbow?"
                row["conversation"][1]["text"] = "orange"
        path = folder / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out.append(str(path))
    return out[0], out[1]


def _spec(name: str, strategy: str, train: str, eval_: str, cap: int | None, output: str) -> dict:
    return {
        "architecture": {"name": "qwen2.5vl", "size": "3B"}, "model": {"source": "tiny:qwen2_5_vl"},
        "compute": {"precisionType": "BFloat16"}, "task": "vqa", "data": {"train": train, "eval": eval_},
        "hyperparameters": {"epochs": 1, "learningRate": 1e-3, "batchSize": 2},
        "lora": {"dropout": 0.0}, "evaluation": {"maxNewTokens": 2, "temperature": 0, "repetitionPenalty": 1.0,
                                                 "maxSamples": cap, "batchSize": EVAL_BATCH.get(name)},
        "cluster": {"workers": 2, "strategy": strategy}, "output": output, "name": name,
    }


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    configs, runs = [], {}
    for name, (strategy, evals, text_only, cap, _) in CELLS.items():
        train, eval_ = _data(out / "data" / name, evals, text_only)
        prepared = prepare(validate_spec(_spec(name, strategy, train, eval_, cap, str(out / "runs"))))
        write_run_files(prepared)
        configs.append(worker_config(prepared, rows_in=str(out / "rows" / name)))
        runs[name] = prepared.run
    outcomes = run_workers(configs, 2, keep_going=True, entry=entry)
    return {name: (runs[name], outcome) for name, outcome in zip(CELLS, outcomes)}


@pytest.mark.timeout(900)  # the cells take a few minutes; a hang would otherwise wait for gloo's 30 minutes
@pytest.mark.parametrize("name", list(CELLS))
def test_every_rank_evaluates_without_a_hang(evaluated, name):
    run, outcome = evaluated[name]
    if not outcome.ok:
        pytest.fail(f"{name} failed:\n{outcome.report()}", pytrace=False)
    strategy, evals, _, cap, gather = CELLS[name]
    records = [r for r in run.read_metrics() if "eval/loss" in r]
    assert [r["step"] for r in records] == [0, 2]  # before the first step and at the end (2 samples a step)
    for record in records:
        # Every held-out sample under the cap scored exactly once; a rank with none joined the others.
        assert record["eval/samples"] == (min(evals, cap) if cap else evals)
        assert record["eval/loss"] > 0 and "eval/exact_match" in record
        sharded = strategy != "ddp"
        assert record["eval_gathers"] == (1 if sharded and gather else 0)
        assert record["eval_synced"] == (1 if sharded and not gather else 0)


def test_the_sample_cap_is_stated_and_defaulted():
    from vray.spec import EvaluationBlock

    assert EvaluationBlock().maxSamples == 256
    with pytest.raises(ValueError):
        EvaluationBlock(maxSamples=0)


def test_lockstep_evaluation_refuses_mixed_media_before_any_rank_waits():
    """Where the model cannot be gathered, a text-only batch on one rank and an image batch on another would gather
    different layers: the mix is refused with the fix, not left to hang."""
    from types import SimpleNamespace

    import torch

    from vray.data.sample import Sample
    from vray.errors import VrayError
    from vray.train.loop import Recipe

    def sample(images: list[str]) -> Sample:
        return Sample.model_validate({"id": "s", "task": "vqa", "images": images, "conversation": [
            {"role": "user", "text": "What colour?"}, {"role": "assistant", "text": "red"}]})

    recipe = SimpleNamespace(device=torch.device("cpu"), engine=SimpleNamespace(name="fsdp2"),
                             data=SimpleNamespace(eval_filler=[sample(["/x.png"])]))
    Recipe._check_lockstep_media(recipe, [[sample(["/y.png"])]])  # every sample has an image: fine
    with pytest.raises(VrayError, match="mixes samples with and without images.*data.eval"):
        Recipe._check_lockstep_media(recipe, [[sample([])]])
