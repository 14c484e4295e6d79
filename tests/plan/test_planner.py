"""The planner: fits within capacity, fewest GPUs on an open-ended inventory and the fastest width on a cluster,
batch preserved, multi-node cases, what would fit, CLI."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from tests.conftest import run_cli
from vray.archs import registry
from vray.errors import VrayError
from vray.models.params import param_counts
from vray.plan.gpus import CATALOG, Inventory, gpu
from vray.plan.memory import Layout, estimate, sample_shape
from vray.plan.planner import placement, plan_run, search, workload_of
from vray.plan.profile import arch_profile
from vray.spec import validate_spec

GIB = 1024**3


def _spec(name, size, mode="LoRA", batch=8, **extra):
    data = {"architecture": {"name": name, "size": size}, "trainingMode": {"type": mode},
            "hyperparameters": {"batchSize": batch}, **extra}
    return validate_spec(data)


def _check_invariants(spec, plan, inventory):
    assert plan.fits
    assert plan.per_gpu_bytes.total + plan.margin_bytes <= plan.capacity_bytes == inventory.gpu.memory_bytes
    assert plan.load_peak_bytes.per_gpu + plan.margin_bytes <= plan.capacity_bytes
    assert plan.load_peak_bytes.per_host <= inventory.host_memory_per_gpu * inventory.gpus_per_node
    assert plan.micro_batch * plan.grad_accum * plan.num_workers == spec.hyperparameters.effective_batch
    assert plan.nodes == math.ceil(plan.num_workers / inventory.gpus_per_node)
    assert plan.margin_bytes == int(0.05 * plan.capacity_bytes + GIB)


# The multi-node cases: each needs more memory than one node of its GPUs has.
MULTI_NODE = [
    ("qwen3vl", "32B", "Full", "A100-40GB", 8),
    ("qwen3.5", "27B", "Full", "A100-40GB", 8),
    ("qwen3.5", "35B-A3B", "Full", "A100-40GB", 8),
    ("qwen3.5", "35B-A3B", "LoRA", "A10G-24GB", 2),
    ("qwen3vl", "30B-A3B", "LoRA", "A10G-24GB", 2),
    ("qwen2.5vl", "72B", "Full", "H100-80GB", 8),
]


@pytest.mark.parametrize(("name", "size", "mode", "kind", "gpn"), MULTI_NODE)
def test_multi_node_cases_plan(name, size, mode, kind, gpn):
    spec = _spec(name, size, mode, batch=32)
    inventory = Inventory(gpu(kind), gpn, None)
    plan = plan_run(spec, inventory)
    _check_invariants(spec, plan, inventory)
    assert plan.nodes >= 2 and plan.strategy in ("zero3", "fsdp2", "fsdp2-hybrid")
    # One node is not enough without offload, and not even with it for the largest.
    profile = arch_profile(spec.arch)
    assert search(profile, workload_of(spec), sample_shape(profile), Inventory(gpu(kind), gpn, 1), 32,
                  allow_offload=False) is None
    d = plan.to_dict()
    assert d["scaling_config"]["num_workers"] == plan.num_workers and d["scaling_config"]["use_gpu"]
    assert d["scaling_config"]["placement_strategy"] == "PACK"
    if plan.strategy.startswith("fsdp2"):
        assert d["fsdp"]["reduce_dtype"] == "float32" and d["fsdp"]["param_dtype"] == "bfloat16"
    else:
        assert d["deepspeed"]["train_batch_size"] == 32 and d["deepspeed"]["zero_optimization"]["stage"] == 3


def test_fewest_gpus_when_open_ended_the_fastest_width_on_a_cluster():
    spec = _spec("qwen2.5vl", "7B")
    plan = plan_run(spec, Inventory(gpu("A100-80GB")))
    assert (plan.num_workers, plan.strategy) == (1, "ddp")
    # One node of 8: the data-parallel width with the fastest step among the divisors of the effective batch (8).
    node = plan_run(spec, Inventory(gpu("A100-80GB"), 8, 1))
    assert (node.num_workers, node.strategy, node.effective_batch) == (8, "ddp", 8)
    assert node.layouts["minimum"]["num_workers"] == 1
    full = _spec("qwen2.5vl", "7B", "Full")
    plan = plan_run(full, Inventory(gpu("A100-80GB")))
    _check_invariants(full, plan, Inventory(gpu("A100-80GB")))
    profile = arch_profile(full.arch)
    for smaller in (n for n in (1, 2, 4, 8) if n < plan.num_workers):
        assert search(profile, workload_of(full), sample_shape(profile), Inventory(gpu("A100-80GB")), 8, workers=smaller,
                      allow_offload=False) is None


def test_gradient_checkpointing_only_when_needed():
    spec = _spec("qwen3vl", "8B")
    roomy = plan_run(spec, Inventory(gpu("H200-141GB")))
    assert roomy.gradient_checkpointing is False
    tight = plan_run(spec, Inventory(gpu("L4-24GB")))
    assert tight.fits and tight.gradient_checkpointing is True
    # Without checkpointing nothing fits at that worker count on that GPU.
    profile = arch_profile(spec.arch)
    w, sample = workload_of(spec), sample_shape(profile)
    for micro in (1,):
        est = estimate(profile, w, Layout(tight.strategy, tight.num_workers, 8, micro, False), sample, gpu("L4-24GB").memory_bytes)
        assert not est.fits


def test_offload_only_when_nothing_else_fits():
    spec = _spec("qwen3vl", "32B", "Full", batch=32)
    one_node = plan_run(spec, Inventory(gpu("A100-40GB"), 8, 1))
    assert one_node.fits and one_node.strategy == "zero3-offload"
    assert one_node.assumptions["cpu_bytes_per_rank"] > 0
    assert one_node.deepspeed["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    enough = plan_run(spec, Inventory(gpu("A100-40GB"), 8, 4))
    assert enough.strategy != "zero3-offload"


def test_more_workers_when_asked_with_the_batch_preserved():
    spec = _spec("qwen2.5vl", "7B", batch=16, cluster={"workers": 16})
    plan = plan_run(spec, Inventory(gpu("A100-80GB")))
    assert (plan.num_workers, plan.nodes, plan.micro_batch * plan.grad_accum) == (16, 2, 1)
    with pytest.raises(VrayError, match="does not divide the effective batch"):
        plan_run(_spec("qwen2.5vl", "7B", batch=8, cluster={"workers": 3}), Inventory(gpu("A100-80GB")))


def test_not_fitting_says_why_and_what_would():
    spec = _spec("qwen3vl", "235B-A22B", "Full", batch=8)
    plan = plan_run(spec, Inventory(gpu("A100-40GB"), 8, 2))
    assert not plan.fits and "A100-40GB" in plan.reason
    text = " | ".join(plan.suggestions)
    assert "LoRA" in text and "would fit" in text
    bf16_t4 = plan_run(_spec("qwen2.5vl", "3B"), Inventory(gpu("T4-16GB")))
    assert not bf16_t4.fits and "bfloat16" in bf16_t4.reason and "Float16" in bf16_t4.suggestions[0]
    fp16 = plan_run(_spec("qwen2.5vl", "3B", compute={"precisionType": "Float16"}), Inventory(gpu("T4-16GB")))
    assert fp16.fits


def test_batch_too_small_for_the_gpus_needed():
    spec = _spec("qwen2.5vl", "72B", "Full", batch=8)
    # On H100 nodes (2 TB of host memory) ZeRO-3 offload holds it on eight GPUs...
    offload = plan_run(spec, Inventory(gpu("H100-80GB")))
    assert offload.fits and offload.strategy == "zero3-offload" and offload.num_workers == 8
    # ...but A100 nodes have too little host memory for that, and 8 samples cannot feed the GPUs it needs.
    plan = plan_run(spec, Inventory(gpu("A100-80GB")))
    assert not plan.fits
    assert any("multiple of" in s for s in plan.suggestions)
    assert plan_run(_spec("qwen2.5vl", "72B", "Full", batch=32), Inventory(gpu("A100-80GB"))).fits


def test_parameter_counts_come_from_the_meta_model():
    for key in (("qwen3vl", "8B"), ("qwen3.5", "35B-A3B"), ("nvila-lite", "2B")):
        arch = registry.get(*key)
        assert arch_profile(arch).total_params == param_counts(arch).total
    # Not the size in the name: "8B" holds 8.77B parameters.
    assert arch_profile(registry.get("qwen3vl", "8B")).total_params == 8767123696


def test_placement_packs_nodes_and_refuses_what_the_cluster_lacks():
    spec = _spec("qwen2.5vl", "7B", batch=16, cluster={"workers": 16})
    plan = plan_run(spec, Inventory(gpu("A100-80GB")))
    assert placement(plan, [8, 8]) == [0] * 8 + [1] * 8
    assert placement(plan, [4, 8, 8]) == [1] * 8 + [2] * 8  # full nodes first
    with pytest.raises(VrayError, match="needs 16 GPU\\(s\\) on 2 node"):
        placement(plan, [8, 4])


def test_every_gpu_kind_in_the_catalog():
    assert list(CATALOG) == ["T4-16GB", "L4-24GB", "A10G-24GB", "A100-40GB", "A100-80GB", "H100-80GB", "H200-141GB",
                             "B200-192GB"]
    assert not CATALOG["T4-16GB"].bf16 and all(g.bf16 for n, g in CATALOG.items() if n != "T4-16GB")
    with pytest.raises(VrayError, match="did you mean 'H100-80GB'"):
        gpu("H100")


def test_cli_plan_human_and_json(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"architecture": {"name": "qwen3vl", "size": "32B"}, "trainingMode": {"type": "Full"},
                                    "hyperparameters": {"batchSize": 32}}))
    proc = run_cli("plan", str(spec), "--gpu", "A100-40GB", "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    for key in ("fits", "strategy", "num_workers", "nodes", "gpus_per_node", "micro_batch", "grad_accum",
                "gradient_checkpointing", "per_gpu_bytes", "capacity_bytes", "margin_bytes", "assumptions", "estimate",
                "scaling_config"):
        assert key in d
    assert set(d["per_gpu_bytes"]) == {"weights", "gradients", "optimizer", "activations", "other", "total"}
    assert set(d["load_peak_bytes"]) == {"per_gpu", "per_host"}
    assert 0 < d["load_peak_bytes"]["per_gpu"] + d["margin_bytes"] <= d["capacity_bytes"]
    assert d["nodes"] >= 2 and d["assumptions"]["sequence"] == 512 + d["assumptions"]["visual_tokens"]
    assert {"step_seconds", "hours", "gpu_hours"} <= set(d["estimate"])
    assert d["assumptions"]["sample_from"].startswith("assumed: no data at hand")
    assert d["minimum"]["num_workers"] == d["num_workers"] and d["fastest"]["num_workers"] >= d["num_workers"]


def test_cli_plan_exit_codes_and_human_output(tmp_path):
    from typer.testing import CliRunner

    from vray.cli import app

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"architecture": {"name": "qwen3vl", "size": "32B"}, "trainingMode": {"type": "Full"},
                                    "hyperparameters": {"batchSize": 32}}))
    runner = CliRunner()
    human = runner.invoke(app, ["plan", str(spec), "--gpu", "A100-40GB", "--nodes", "1", "--set", "trainingMode.type=LoRA"])
    assert human.exit_code == 0, human.output
    assert "per GPU (A100-40GB)" in human.output and "headroom" in human.output and "plan: " in human.output
    assert "load peak (while the model loads)" in human.output and "GiB of host memory per node" in human.output
    assert "sized from assumed: no data at hand" in human.output
    nofit = runner.invoke(app, ["plan", str(spec), "--gpu", "T4-16GB", "--nodes", "1", "--json"])
    assert nofit.exit_code == 2 and json.loads(nofit.output)["fits"] is False
    nvila = tmp_path / "nvila.yaml"
    nvila.write_text(yaml.safe_dump({"architecture": {"name": "nvila-lite", "size": "2B"}}))
    refused = run_cli("plan", str(nvila), "--gpu", "A100-80GB", timeout=120)
    assert refused.returncode == 1 and "full fine-tuning only" in refused.stderr and "Traceback" not in refused.stderr


def test_vram_table_covers_every_checkpoint():
    from vray.plan.vram_table import MODES, vram_table

    rows = vram_table()
    assert len(rows) == 21 * len(MODES)
    by = {(r["name"], r["size"], r["mode"]): r for r in rows}
    assert by[("nvila-lite", "2B", "LoRA")]["gpus"]["A100-80GB"] == "n/a"
    assert by[("qwen2.5vl", "3B", "LoRA")]["gpus"]["A100-80GB"] == "1"
    assert by[("qwen2.5vl", "72B", "Full")]["assumed"] is True
    assert int(by[("qwen2.5vl", "72B", "Full")]["gpus"]["H100-80GB"]) > 8
    # Monotone in GPU memory: a bigger GPU never needs more of itself.
    for r in rows:
        counts = [r["gpus"][k] for k in ("A100-40GB", "A100-80GB", "H200-141GB")]
        nums = [int(c) if c.isdigit() else 10**6 for c in counts if c != "n/a"]
        assert nums == sorted(nums, reverse=True)


def test_the_planner_knows_every_strategy_and_only_those():
    """The strategy names live in vray.spec; the planner's tables cover each one and invent none."""
    from vray.plan.planner import MFU, OFFLOAD, STRATEGIES_BY_MODE
    from vray.spec import STRATEGIES

    assert set(MFU) == set(STRATEGIES)
    for mode in ("full", "lora", "qlora"):
        assert set(STRATEGIES_BY_MODE[mode]) | set(OFFLOAD[mode]) <= set(STRATEGIES)
