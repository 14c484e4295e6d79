"""The planner sizes the data it is given, packs it, picks checkpointing by estimated step time, and uses the
cluster: the fastest data-parallel width on an inventory of known size."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vray.errors import DataError
from vray.plan.gpus import Inventory, gpu
from vray.plan.memory import GIB, Layout, estimate, margin_bytes
from vray.plan.planner import DataSizes, plan_run, sample_of, step_estimate, workload_of
from vray.plan.profile import arch_profile
from vray.spec import validate_spec


def _spec(name, size, batch=8, **extra):
    return validate_spec({"architecture": {"name": name, "size": size}, "trainingMode": {"type": "LoRA"},
                          "hyperparameters": {"batchSize": batch}, **extra})


def _data(tokens, mean=None, images=1):
    return DataSizes(tokens, mean or tokens, images, False, "train.jsonl:7")


def test_the_plan_sizes_the_longest_sample_of_the_data_and_says_so():
    spec = _spec("qwen3vl", "8B")
    inventory = Inventory(gpu("H100-80GB"), 8, 1)
    assumed = plan_run(spec, inventory)
    assert assumed.assumptions["sample_from"].startswith("assumed")
    short, long_ = plan_run(spec, inventory, data=_data(1000)), plan_run(spec, inventory, data=_data(8000))
    assert long_.assumptions["sequence"] == 8000 and short.assumptions["sequence"] == 1000
    assert "train.jsonl:7" in long_.assumptions["sample_from"] and "8000 tokens" in long_.assumptions["sample_from"]
    # Packing (the planner's choice): rows of micro-batch x the longest sample, which never splits one.
    assert long_.pack_tokens == long_.layouts["fastest"]["micro_batch"] * 8000
    # Per token the same memory; the longer sample takes more per micro-batch.
    one = Layout("ddp", 1, 8, 1, False)
    profile, w = arch_profile(spec.arch), workload_of(spec)
    mem = [estimate(profile, w, one, sample_of(spec, profile, _data(n)), gpu("H100-80GB").memory_bytes).memory.activations
           for n in (1000, 8000)]
    assert mem[1] > 6 * mem[0]


def test_pack_tokens_sizes_one_row_and_zero_pads():
    spec = _spec("qwen3vl", "8B", data={"packTokens": 16384})
    plan = plan_run(spec, Inventory(gpu("H100-80GB"), 8, 1), data=_data(4000))
    assert plan.pack_tokens == 16384 and plan.assumptions["sequence"] == 16384
    assert "packed row of 16384" in plan.assumptions["sample_from"]
    padded = plan_run(_spec("qwen3vl", "8B", data={"packTokens": 0}), Inventory(gpu("H100-80GB"), 8, 1),
                      data=_data(4000))
    assert padded.pack_tokens is None and padded.assumptions["sequence"] == 4000
    with pytest.raises(DataError, match="train.jsonl:7.*at least 20000"):
        plan_run(spec, Inventory(gpu("H100-80GB"), 8, 1), data=_data(20000))


def test_a_sample_longer_than_pack_tokens_is_an_error_of_its_row(tmp_path):
    from rich.console import Console

    from vray.train.prepare import check_data

    Image.new("RGB", (64, 64), (255, 0, 0)).save(tmp_path / "a.png")
    rows = [{"id": f"r{i}", "task": "vqa", "images": ["a.png"],
             "conversation": [{"role": "user", "text": "<image>What colour?"},
                              {"role": "assistant", "text": " ".join(["red"] * n)}]} for i, n in enumerate((3, 200))]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    spec = validate_spec({"architecture": {"name": "qwen2.5vl", "size": "3B"}, "model": {"source": "tiny:qwen2_5_vl"},
                          "data": {"train": str(tmp_path / "train.jsonl"), "packTokens": 100}})
    with pytest.raises(DataError, match=r"train.jsonl:2.*longer than data.packTokens \(100\).*at least"):
        check_data(spec, str(tmp_path / "train.jsonl"), None, False, Console(quiet=True))
    kept = check_data(spec, str(tmp_path / "train.jsonl"), None, True, Console(quiet=True))
    assert [s.id for s in kept.samples[str(tmp_path / "train.jsonl")]] == ["r0"]
    # Without packTokens, `vray plan` checks the data first and sizes its longest row (row 2, counted exactly).
    from vray.train.prepare import plan_checked

    unpacked = spec.model_copy(update={"data": spec.data.model_copy(update={"packTokens": None})})
    plan = plan_checked(unpacked, Inventory(gpu("L4-24GB"), 1, 1))
    assert "train.jsonl:2" in plan.assumptions["sample_from"] and "counted by the processor" in plan.assumptions["sample_from"]
    assert plan.assumptions["sequence"] > 200 and plan.assumptions["dataset_samples"] == 2


def test_every_k_checkpointing_orders_memory_and_step_time():
    spec = _spec("qwen3vl", "8B")
    profile, w = arch_profile(spec.arch), workload_of(spec)
    sample = sample_of(spec, profile, _data(4096))
    h100 = gpu("H100-80GB")
    by_k = {}
    for k in (0, 8, 4, 2, 1):  # off, then ever more layers recomputed
        layout = Layout("ddp", 1, 8, 1, k > 0, max(k, 1))
        act = estimate(profile, w, layout, sample, h100.memory_bytes).memory.activations
        secs = step_estimate(profile, w, layout, sample, h100, 8, 1000, 1)["step_seconds"]
        by_k[k] = (act, secs)
    acts, times = [by_k[k][0] for k in (0, 8, 4, 2, 1)], [by_k[k][1] for k in (0, 8, 4, 2, 1)]
    assert acts == sorted(acts, reverse=True) and len(set(acts)) == 5
    assert times == sorted(times) and len(set(times)) == 5
    # every layer recomputed: LoRA's step is forward + input-gradient backward + the forward again, about 1.5x
    assert 1.4 < by_k[1][1] / by_k[0][1] <= 1.5
    # a larger micro-batch runs faster per sample (tokens per micro-batch), so the trade is real
    two = step_estimate(profile, w, Layout("ddp", 1, 8, 2, False), sample, h100, 8, 1000, 1)["step_seconds"]
    assert two < by_k[0][1]


def test_auto_checkpointing_picks_the_fastest_policy_that_fits():
    spec = _spec("qwen3vl", "8B", batch=16)
    inventory = Inventory(gpu("A100-40GB"), 1, 1)
    auto = plan_run(spec, inventory, data=_data(2048))
    forced = {s: plan_run(spec.model_copy(update={"cluster": spec.cluster.model_copy(
        update={"gradientCheckpointing": s})}), inventory, data=_data(2048)) for s in ("off", "on", "every:2", "every:4")}
    fitting = {s: p.estimate["step_seconds"] for s, p in forced.items() if p.fits}
    assert len(fitting) >= 2  # a real choice
    assert auto.estimate["step_seconds"] == min(fitting.values())
    assert auto.gradient_checkpointing is (auto.estimate["recompute_share"] > 0)
    roomy = plan_run(spec, Inventory(gpu("H200-141GB"), 1, 1), data=_data(1024))
    assert not roomy.gradient_checkpointing  # nothing to gain from recompute when the largest micro-batch fits


def test_an_8b_lora_on_an_8_gpu_node_uses_all_8_unless_workers_says_otherwise():
    spec = _spec("qwen3vl", "8B", batch=16)
    node = Inventory(gpu("H100-80GB"), 8, 1)
    plan = plan_run(spec, node)
    assert plan.num_workers == 8 and plan.effective_batch == 16
    d = plan.to_dict()
    assert d["minimum"]["num_workers"] == 1 and d["fastest"]["num_workers"] == 8
    assert d["fastest"]["step_seconds"] < d["minimum"]["step_seconds"]
    pinned = plan_run(_spec("qwen3vl", "8B", batch=16, cluster={"workers": 2}), node)
    assert pinned.num_workers == 2 and pinned.effective_batch == 16
    # An open-ended inventory (as many nodes as needed): the fewest GPUs.
    assert plan_run(spec, Inventory(gpu("H100-80GB"), 8, None)).num_workers == 1


def test_qwen3_5_9b_lora_at_batch_1_fits_one_24gb_gpu_without_offload():
    spec = _spec("qwen3.5", "9B", batch=1)
    l4 = Inventory(gpu("L4-24GB"), 1, 1)
    plan = plan_run(spec, l4)
    assert plan.fits and plan.strategy == "ddp" and plan.num_workers == 1 and plan.gradient_checkpointing
    assert plan.margin_bytes == margin_bytes(gpu("L4-24GB").memory_bytes) == int(0.05 * plan.capacity_bytes + GIB)
    assert plan.per_gpu_bytes.total + plan.margin_bytes <= plan.capacity_bytes
    assert plan.per_gpu_bytes.weights > 18.8e9  # the bf16 weights alone
    assert plan.assumptions["activation_parts"]["logits"] < 1e9  # no full-vocabulary logits
    # A 4096-token sample too, at the default adapter dropout (0: no dropped copies of the adapters' inputs).
    long_ = plan_run(spec, l4, data=_data(4096))
    assert long_.fits and long_.strategy == "ddp" and long_.assumptions["sequence"] == 4096
    assert long_.per_gpu_bytes.total + long_.margin_bytes <= long_.capacity_bytes
