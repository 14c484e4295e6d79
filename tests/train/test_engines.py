"""The engine coverage matrix: every family, every engine, every mode, as plain gloo process groups (no Ray).

Each family trains under at least one sharded engine, each engine trains at least two families, and each mode
(LoRA, QLoRA, full) trains under every engine that supports it (QLoRA: ddp, whose 4-bit base is replicated).
One process group runs the cells in turn (a failing cell fails alone); each cell's held-out loss must fall.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.train.probes import StepProbe, run_cell, write_dataset
from vray.spec import validate_spec
from vray.storage.rundir import RunDir
from vray.train.local import RunOutcome, run_workers
from vray.train.prepare import prepare, worker_config, write_run_files

pytestmark = pytest.mark.slow
COLLECTIVE_TIMEOUT_S = 600  # the process groups' timeout: a mismatched collective fails the cell within it

FAMILY_ARCH = {
    "qwen2_5_vl": ("qwen2.5vl", "3B"), "qwen3_vl": ("qwen3vl", "2B"), "qwen3_vl_moe": ("qwen3vl", "30B-A3B"),
    "qwen3_5": ("qwen3.5", "0.8B"), "qwen3_5_moe": ("qwen3.5", "35B-A3B"), "internvl": ("internvl3.5", "8B"),
    "nvila_lite": ("nvila-lite", "2B"),
}


@dataclass(frozen=True)
class Cell:
    family: str
    strategy: str
    mode: str  # lora | qlora | full | lora-experts
    world: int = 2
    checkpointing: bool = False  # cluster.gradientCheckpointing: on
    accumulate: bool = False  # micro-batches of one sample, accumulated (the effective batch stays 8)

    @property
    def id(self) -> str:
        return f"{self.family}-{self.strategy}-{self.mode}" + ("-gc" if self.checkpointing else "")


CELLS = [
    Cell("qwen2_5_vl", "ddp", "lora", checkpointing=True),
    Cell("qwen2_5_vl", "ddp", "qlora"),
    Cell("qwen3_vl", "ddp", "full"),
    Cell("nvila_lite", "ddp", "full", checkpointing=True),
    Cell("qwen3_vl_moe", "ddp", "lora-experts"),
    Cell("qwen2_5_vl", "zero1", "full"),
    Cell("internvl", "zero1", "lora", checkpointing=True),
    Cell("qwen3_vl", "zero2", "lora"),
    Cell("qwen3_5", "zero2", "full", checkpointing=True),
    Cell("qwen3_vl_moe", "zero3", "lora", checkpointing=True),  # PEFT + ZeRO-3 + checkpointing (frozen base)
    Cell("internvl", "zero3", "full"),
    Cell("qwen3_5_moe", "zero3-offload", "lora"),
    Cell("qwen2_5_vl", "zero3-offload", "full", checkpointing=True),
    Cell("qwen3_5", "fsdp2", "lora", checkpointing=True),
    Cell("qwen3_5_moe", "fsdp2", "full"),
    Cell("nvila_lite", "fsdp2", "full"),  # units: the decoder layers and the SigLIP blocks the model runs
    Cell("qwen3_vl_moe", "fsdp2-hybrid", "full", world=4),
    Cell("internvl", "fsdp2-hybrid", "lora", world=4, checkpointing=True, accumulate=True),
]

# One optimizer step on 2 ranks x 2 micro-batches of one sample each: text-only and image samples whose answers
# differ in length. Rank 0's first micro-batch is text-only while rank 1's has an image, and the other way round.
PROBE_ENGINES = ("ddp", "zero2", "zero3", "fsdp2")
PROBE_LAYOUT = (((0,), (1,)), ((2,), (3,)))
PROBE_ANSWERS = ["red blue green red blue", "red", "blue green red blue green red blue", "green"]
PROBE_IMAGES = [False, True, True, False]
PROBE_LR = 1.0


def _probe_dataset(folder: Path) -> str:
    from vray.data.synthetic import split_paths

    train, _ = split_paths("synthetic:vqa?train=8&eval=2")
    rows = [json.loads(line) for line in train.read_text().splitlines()][:len(PROBE_ANSWERS)]
    for row, answer, image in zip(rows, PROBE_ANSWERS, PROBE_IMAGES):
        row["conversation"][1]["text"] = answer
        row["images"] = [str(train.parent / row["images"][0])] if image else []
    return write_dataset(folder, rows)


def _probe_spec(strategy: str, data: str, output: str) -> dict:
    return {
        "architecture": {"name": "qwen3vl", "size": "2B"}, "model": {"source": "tiny:qwen3_vl"},
        "trainingMode": {"type": "Full"}, "compute": {"precisionType": "Float32"}, "task": "vqa",
        "data": {"train": data},
        "hyperparameters": {"epochs": 1, "learningRate": PROBE_LR, "batchSize": 1, "gradientAccumulation": 4,
                            "optimizer": "SGD", "warmupRatio": 0.0, "maxGradNorm": 1e6},
        "cluster": {"workers": 2, "strategy": strategy}, "output": output, "name": f"probe-{strategy}",
    }


def _spec(cell: Cell, output: str) -> dict:
    name, size = FAMILY_ARCH[cell.family]
    return {
        "architecture": {"name": name, "size": size}, "model": {"source": f"tiny:{cell.family}"},
        "trainingMode": {"type": "Full" if cell.mode == "full" else "LoRA"},
        "quantization": {"enabled": cell.mode == "qlora"}, "compute": {"precisionType": "BFloat16"},
        "task": "vqa", "data": {"train": "synthetic:vqa?train=32&eval=8"},
        "hyperparameters": {"epochs": 1, "learningRate": 3e-3, "batchSize": 1 if cell.accumulate else 8,
                            "gradientAccumulation": 8 if cell.accumulate else 1},
        "lora": {"dropout": 0.0, "experts": cell.mode == "lora-experts"},
        "evaluation": {"maxNewTokens": 2, "temperature": 0, "repetitionPenalty": 1.0},
        "cluster": {"workers": cell.world, "strategy": cell.strategy,
                    "gradientCheckpointing": "on" if cell.checkpointing else "off"},
        "output": output, "name": cell.id,
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, tuple[RunDir, RunOutcome]]:
    """Every cell trained, with how it ended: the 2-process cells in one process group, the 4-process ones in
    another; the 2-process group also runs the step probes (their outcomes under `probe-<engine>`). A cell that
    fails is recorded and the group carries on with the next (in fresh processes), so one cell's failure fails that
    cell alone. Every collective is bounded: a rank left waiting for its peers fails the cell instead of hanging."""
    out = str(tmp_path_factory.mktemp("engines"))
    data = _probe_dataset(Path(out) / "probe-data")
    runs: dict[str, tuple[RunDir, RunOutcome]] = {}
    for world in (2, 4):
        cells = [c for c in CELLS if c.world == world]
        configs, dirs, ids = [], [], []
        for cell in cells:
            prepared = prepare(validate_spec(_spec(cell, out)))
            write_run_files(prepared)
            configs.append(worker_config(prepared, rows_in=f"{out}/rows/{cell.id}"))
            dirs.append(prepared.run)
            ids.append(cell.id)
        if world == 2:
            for strategy in PROBE_ENGINES:
                prepared = prepare(validate_spec(_probe_spec(strategy, data, out)))
                write_run_files(prepared)
                config = worker_config(prepared, rows_in=f"{out}/rows/probe-{strategy}")
                configs.append(StepProbe(config, PROBE_LAYOUT, str(prepared.run.root / "probe.pt")))
                dirs.append(prepared.run)
                ids.append(f"probe-{strategy}")
        outcomes = run_workers(configs, world, keep_going=True, entry=run_cell, timeout_s=COLLECTIVE_TIMEOUT_S)
        runs.update({key: (run, outcome) for key, run, outcome in zip(ids, dirs, outcomes)})
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
    assert {c.strategy for c in CELLS if c.checkpointing} == set(STRATEGIES)
    assert any(c.checkpointing and c.strategy == "zero3" and c.mode == "lora" for c in CELLS)
    assert any(c.accumulate and c.strategy == "fsdp2-hybrid" for c in CELLS)  # the all-reduce skipped, then run


def test_fsdp2_shards_nvila_lite_per_decoder_layer_and_per_siglip_block_it_runs():
    """NVILA-Lite's FSDP2 units are the LLM's decoder layers and the SigLIP blocks up to the feature layer (the
    checkpoint's unused last block is not built, so it is no unit), then the embedding and LM head."""
    from vray.models.loader import prepare_for_training, resolve_source
    from vray.train.engines import shard_units

    spec = validate_spec(_spec(Cell("nvila_lite", "fsdp2", "full"), "unused"))
    arch = spec.arch
    model, _ = prepare_for_training(resolve_source("tiny:nvila_lite"), arch, "Full", "Float32", None, spec.lora,
                                    torch.device("cpu"))
    units = shard_units(model, arch.language_model_prefix, arch.vision_modules)
    decoder = list(model.get_submodule(f"{arch.language_model_prefix}.layers"))
    blocks = list(model.vision_tower.encoder.layers)
    assert len(decoder) == 2 and len(blocks) == 2  # tiny: 2 decoder layers; SigLIP 3 in the checkpoint, 2 run
    assert [id(u) for u in units[:4]] == [id(m) for m in decoder + blocks]
    assert all(isinstance(u, list) or u in (model.get_input_embeddings(), model.get_output_embeddings())
               for u in units[4:]) and units[4:]


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


def _probe_reference(run: RunDir) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
    """In this process, without an engine: the weights after one SGD step (lr 1, first step: minus the gradient) on
    one batch holding every probe sample, with transformers' own loss (the token mean over the batch); the same
    step with each sample weighted equally (the per-micro-batch mean); and the batch's loss. The run's resolved
    spec gives the collator (its system prompt) the probes used."""
    import yaml

    from vray.data.io import read_jsonl
    from vray.models.loader import prepare_for_training, resolve_source
    from vray.train.loop import CollatorFactory

    spec = validate_spec(yaml.safe_load(run.spec.read_text()))
    collator = CollatorFactory.of(spec)()
    encoded = [collator.encode(s) for s in read_jsonl(spec.data.train)]

    def step(weighting: str) -> tuple[dict[str, torch.Tensor], float]:
        model, _ = prepare_for_training(resolve_source("tiny:qwen3_vl"), spec.arch, "Full", "Float32", None,
                                        spec.lora, torch.device("cpu"))
        if weighting == "token":
            loss = model(**collator.batch(encoded)).loss
        else:
            loss = sum(model(**collator.batch([e])).loss for e in encoded) / len(encoded)
        loss.backward()
        return ({n: (p - PROBE_LR * p.grad).detach() for n, p in model.named_parameters() if p.requires_grad},
                float(loss.detach()))

    token, loss = step("token")
    return token, step("sample")[0], loss


@pytest.fixture(scope="module")
def probe_reference(trained) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
    return _probe_reference(trained[f"probe-{PROBE_ENGINES[0]}"][0])


@pytest.mark.parametrize("strategy", PROBE_ENGINES)
def test_a_step_weighs_every_answer_token_equally_across_micro_batches_and_ranks(trained, probe_reference, strategy):
    """Under each engine, 2 ranks x 2 micro-batches of one sample (text-only on one rank while the other has an
    image) take the same step as one batch holding all four: the gradient of the mean over the answer tokens. The
    text-only micro-batches neither hang nor raise (the vision dummy), and contribute nothing through it."""
    run, outcome = trained[f"probe-{strategy}"]
    if not outcome.ok:
        pytest.fail(f"probe-{strategy} failed:\n{outcome.report()}", pytrace=False)
    reference, per_sample, loss = probe_reference
    got = torch.load(run.root / "probe.pt", weights_only=False)
    assert got["weights"].keys() == reference.keys()
    assert abs(got["loss"] - loss) < 1e-5
    worst = max(float((got["weights"][n] - reference[n]).abs().max()) for n in reference)
    assert worst < 1e-5, worst
    # Weighting each sample (micro-batch) equally moves the weights far more than that: the check can fail.
    assert max(float((per_sample[n] - reference[n]).abs().max()) for n in reference) > 1e-3
