"""Sharded loading, measured: a checkpoint of real widths and vocabulary (Qwen2.5-VL-3B's, 1.0B parameters with 8
decoder layers and 2 vision blocks, stored in Float32 as on disk before a bf16 run), trained with LoRA at
BFloat16 on 2 gloo ranks, one micro-batch of one 56x56 image and a short question each.

Each rank's anonymous-memory high-water mark (RssAnon, sampled) is compared with the model's bf16 bytes and with
the planner's prediction. Under zero3 and fsdp2 no rank may hold the whole model while it loads: at most 0.6x its
bf16 bytes above the process's fixed overhead (measured in the same processes without a model). ddp holds all of
it, which shows the bound can fail. The load and first-step peaks are each compared with the plan's prediction for
the batch trained. (At 2 ranks this checkpoint's step does not stay under the bound: ZeRO-3 and FSDP2 gather its
311M-parameter tied embedding whole, up to twice with prefetch, which costs more than sharding a 1.0B model over 2
ranks saves; the plan predicts that too.)
"""

from __future__ import annotations

import pytest

from vray.archs import registry
from vray.testing.memory import measure_engines
from vray.testing.real_shaped import write_sized_checkpoint

pytestmark = pytest.mark.slow

TEXT_LAYERS, VISION_BLOCKS = 8, 2
BOUND = 0.6  # of the unsharded bf16 model, per rank, above the fixed overhead
PLAN_TOLERANCE = 0.15
STRATEGIES = ("ddp", "zero3", "fsdp2")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    arch = registry.get("qwen2.5vl", "3B")
    folder = write_sized_checkpoint(arch, tmp_path_factory.mktemp("sized") / "qwen2.5vl-3b-8l",
                                    text_layers=TEXT_LAYERS, vision_layers=VISION_BLOCKS, dtype="float32")
    return folder


@pytest.fixture(scope="module")
def measured(checkpoint, tmp_path_factory):
    return measure_engines(checkpoint, STRATEGIES, str(tmp_path_factory.mktemp("sharded-runs")))


def _model_bf16_bytes(checkpoint) -> int:
    import json

    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    return index["metadata"]["total_size"] // 2  # stored in Float32: 4 bytes a parameter, bf16 holds 2


def test_the_checkpoint_is_real_sized(checkpoint):
    assert _model_bf16_bytes(checkpoint) // 2 >= 1_000_000_000  # at least 1B parameters


@pytest.mark.parametrize("strategy", ["zero3", "fsdp2"])
def test_no_rank_holds_the_whole_model_while_loading(measured, checkpoint, strategy):
    model = _model_bf16_bytes(checkpoint)
    for rank in measured[strategy]["ranks"]:
        held = rank["load_peak_bytes"] - rank["overhead_bytes"]
        assert held <= BOUND * model, (strategy, held / model)


def test_ddp_holds_the_whole_model(measured, checkpoint):
    model = _model_bf16_bytes(checkpoint)
    for rank in measured["ddp"]["ranks"]:
        assert rank["load_peak_bytes"] - rank["overhead_bytes"] >= 0.9 * model


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_rank_matches_the_plan(measured, strategy):
    plan, ranks = measured[strategy]["plan"], measured[strategy]["ranks"]
    predicted_load = plan.load_peak_bytes.per_gpu
    predicted_step = plan.per_gpu_bytes.total
    for rank in ranks:
        load = rank["load_peak_bytes"] - rank["overhead_bytes"]
        step = rank["step_peak_bytes"] - rank["overhead_bytes"]
        assert abs(load - predicted_load) <= PLAN_TOLERANCE * predicted_load, (strategy, load, predicted_load)
        assert abs(step - predicted_step) <= PLAN_TOLERANCE * predicted_step, (strategy, step, predicted_step)
