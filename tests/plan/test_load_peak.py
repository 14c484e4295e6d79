"""The load-time peak, FSDP2's units and gradients, the hybrid mesh and MoE's MFU, against numbers computed here from
the published configs (../shared/reference/arch_configs.json via the shipped configs), not from the planner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vray.archs import registry
from vray.errors import VrayError
from vray.plan.engine_config import fsdp_settings, hybrid_mesh
from vray.plan.gpus import Inventory, gpu
from vray.plan.memory import (
    FRAMEWORK_OVERHEAD,
    LOAD_CHUNK_BYTES,
    Layout,
    Workload,
    estimate,
    fsdp2_buffer_bytes,
    load_peak,
    margin_bytes,
    sample_shape,
)
from vray.plan.planner import MFU, MOE_MFU, micro_batch_efficiency, plan_run, search, workload_of
from vray.plan.profile import arch_profile
from vray.spec import load_spec, validate_spec

GIB = 1024**3
JOBS = Path(__file__).resolve().parents[2] / "jobs"


def _config(name: str, size: str) -> dict:
    """The text and vision config of a registry checkpoint, as its config.json ships it."""
    cfg = registry.get(name, size).config
    return cfg["text_config"], cfg["vision_config"]


def _qwen3vl_32b_by_hand() -> dict[str, int]:
    """Qwen3-VL-32B's parameters from its config: embeddings, LM head, 64 decoder layers, 27 vision blocks."""
    t, v = _config("qwen3vl", "32B")
    h, inter, heads, kv, hd, vocab = (t["hidden_size"], t["intermediate_size"], t["num_attention_heads"],
                                      t["num_key_value_heads"], t["head_dim"], t["vocab_size"])
    layer = h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * inter + 2 * hd + 2 * h  # q k v o, MLP, norms
    vh, vi = v["hidden_size"], v["intermediate_size"]
    block = 4 * vh * vh + 4 * vh + 2 * vh * vi + vi + vh + 4 * vh  # qkv + proj (with biases), MLP, two LayerNorms
    total = 2 * vocab * h + t["num_hidden_layers"] * layer + h + v["depth"] * block  # + the final norm
    return {"embed": vocab * h, "layer": layer, "block": block, "layers": t["num_hidden_layers"],
            "depth": v["depth"], "total": total}


def _spec(name, size, mode="Full", batch=16, **extra):
    return validate_spec({"architecture": {"name": name, "size": size}, "trainingMode": {"type": mode},
                          "hyperparameters": {"batchSize": batch}, **extra})


@pytest.mark.parametrize("job", ["qwen3-vl-32b-full.yaml", "qwen3.5-35b-a3b-full.yaml"])
def test_the_multi_node_jobs_fit_at_load_time_and_at_the_step(job):
    spec = load_spec(JOBS / job)
    inventory = Inventory.for_spec(spec, "A100-40GB")
    plan = plan_run(spec, inventory)
    assert plan.fits and plan.nodes >= 2
    capacity = gpu("A100-40GB").memory_bytes
    margin = margin_bytes(capacity)
    node = gpu("A100-40GB").host_memory_per_gpu * inventory.gpus_per_node
    assert plan.per_gpu_bytes.total + margin <= capacity
    assert 0 < plan.load_peak_bytes.per_gpu and plan.load_peak_bytes.per_gpu + margin <= capacity
    assert 0 < plan.load_peak_bytes.per_host <= node
    # The whole model at the load dtype never sits on one GPU or in one rank's host memory.
    p = arch_profile(spec.arch).total_params
    ranks = min(plan.num_workers, plan.gpus_per_node)
    assert plan.load_peak_bytes.per_gpu < 2 * p / 4
    assert plan.load_peak_bytes.per_host / ranks < 2 * p / 4
    d = json.loads(plan.to_json())
    assert set(d["load_peak_bytes"]) == {"per_gpu", "per_host"}
    assert d["load_peak_bytes"]["per_gpu"] == plan.load_peak_bytes.per_gpu


def test_load_peaks_of_each_loader_for_qwen3_vl_32b_full():
    """Each strategy's load formula with Qwen3-VL-32B's parameters counted from its config: P, the largest tensor
    (the 151936 x 5120 embedding, which is also the largest module), bf16 loads, W = 16 over 2 nodes of 8."""
    hand = _qwen3vl_32b_by_hand()
    profile = arch_profile(registry.get("qwen3vl", "32B"))
    assert profile.total_params == pytest.approx(hand["total"], rel=0.01)  # the rest: patch embed, mergers
    assert profile.largest_tensor == profile.largest_module == hand["embed"]
    p, e = hand["total"], hand["embed"]
    w = Workload("full", "BFloat16")

    def peak(strategy):
        return load_peak(profile, w, Layout(strategy, 16, 8, 1, True))

    # ddp: fp32 weights (the vision tower, 1.2% of P, stays bf16) + the embedding in transit, read at the file's
    # dtype (the registry's checkpoints are published in bf16: 2 bytes an element).
    t = 2 * e
    assert profile.stored_bytes == 2
    assert peak("ddp").per_gpu == pytest.approx(4 * p + t, rel=0.015)
    assert peak("ddp").per_host == 8 * t
    assert peak("zero2").per_gpu == pytest.approx(2 * p + t, rel=0.01)
    assert peak("zero3").per_gpu == pytest.approx(2 * p / 16 + 2 * e + t, rel=0.01)
    assert peak("zero3").per_host == 8 * t
    assert peak("zero3-offload").per_gpu == 2 * e
    assert peak("zero3-offload").per_host == pytest.approx(8 * (2 * p / 16 + t), rel=0.01)
    assert peak("fsdp2").per_gpu == pytest.approx(4 * p / 16 + LOAD_CHUNK_BYTES, rel=0.015)
    assert peak("fsdp2").per_host == 8 * LOAD_CHUNK_BYTES
    # fsdp2-hybrid shards within the node only.
    assert peak("fsdp2-hybrid").per_gpu == pytest.approx(4 * p / 8 + LOAD_CHUNK_BYTES, rel=0.015)
    # LoRA loads the base at bf16 under ddp; the adapters come after the load.
    lora = Workload("lora", "BFloat16", lora_regex=registry.get("qwen3vl", "32B").lora_target_regex())
    assert load_peak(profile, lora, Layout("ddp", 1, 8, 1, True)).per_gpu == pytest.approx(2 * p + t, rel=0.01)


def test_moe_load_peak_counts_the_fused_experts():
    """Qwen3.5-35B-A3B: the largest tensor is a layer's fused gate/up experts (256 x 1024 x 2048), the largest
    module its experts (gate/up + down); P is the published safetensors sum less the MTP layer's own experts."""
    t, _ = _config("qwen3.5", "35B-A3B")
    experts, inter, h = t["num_experts"], t["moe_intermediate_size"], t["hidden_size"]
    gate_up, down = experts * 2 * inter * h, experts * inter * h
    published = 35_951_822_704  # arch_configs.json total_params: with the vision tower and mtp.*
    p = published - (gate_up + down)
    profile = arch_profile(registry.get("qwen3.5", "35B-A3B"))
    assert profile.total_params == pytest.approx(p, rel=0.005)
    assert (profile.largest_tensor, profile.largest_module) == (gate_up, gate_up + down)
    peak = load_peak(profile, Workload("full", "BFloat16"), Layout("zero3", 16, 8, 1, True))
    # the largest tensor read at the file's bf16 in transit
    assert peak.per_gpu == pytest.approx(2 * p / 16 + 2 * (gate_up + down) + 2 * gate_up, rel=0.005)


def test_a_load_that_does_not_fit_is_refused_and_the_reason_names_it():
    # ddp full fine-tuning of 32B on 8x A100-40GB: every rank would load ~125 GiB of fp32 weights.
    spec = _spec("qwen3vl", "32B", batch=8, cluster={"workers": 8, "strategy": "ddp"})
    plan = plan_run(spec, Inventory(gpu("A100-40GB"), 8, 1))
    assert not plan.fits and "load peak" in plan.reason and "per GPU" in plan.reason
    # Only the host fails: a LoRA run whose step fits, on nodes with 1 GiB of CPU memory, cannot read its 2 GiB
    # embedding in fp32 in transit.
    small_host = Inventory(gpu("A100-80GB"), 8, 1, host_memory=128 * 1024**2)
    lora = _spec("qwen2.5vl", "7B", "LoRA", batch=8, cluster={"workers": 1, "strategy": "ddp"})
    profile = arch_profile(lora.arch)
    est = estimate(profile, workload_of(lora), Layout("ddp", 1, 8, 1, True), sample_shape(profile),
                   small_host.gpu.memory_bytes, small_host.host_memory_per_gpu)
    assert est.step_fits and est.load_fits_gpu and not est.load_fits_host and not est.fits
    refused = plan_run(lora, small_host)
    assert not refused.fits and "load peak" in refused.reason and "host memory per node" in refused.reason
    assert "step peak" not in refused.reason


def test_fsdp2_units_are_the_largest_block_and_the_root_is_the_rest():
    """B17: embed_tokens and lm_head are their own units, so the unit is the largest of a decoder layer, the embedding,
    the LM head and a vision block, and the root holds only what is left (patch embedding, mergers, norms)."""
    hand = _qwen3vl_32b_by_hand()
    profile = arch_profile(registry.get("qwen3vl", "32B"))
    units = profile.fsdp_units
    assert units["decoder_layer"] == hand["layer"] and units["embed"] == units["lm_head"] == hand["embed"]
    assert units["vision_block"] == hand["block"]
    assert units["root"] == profile.total_params - hand["layers"] * hand["layer"] - 2 * hand["embed"] \
        - hand["depth"] * hand["block"]
    assert 0 < units["root"] < 0.01 * profile.total_params
    e, root = hand["embed"], units["root"]
    # bf16 compute: root gathered, the unit and its prefetch, the unit's bf16 + fp32 gradient, the root's fp32 one.
    assert fsdp2_buffer_bytes(profile, Workload("full", "BFloat16")) == 2 * root + 2 * 2 * e + 6 * e + 4 * root
    lora = Workload("lora", "BFloat16", lora_regex=registry.get("qwen3vl", "32B").lora_target_regex())
    assert fsdp2_buffer_bytes(profile, lora) < 2 * root + 4 * e + 0.01 * 10 * e  # adapters' gradients are small
    # Tied embeddings (Qwen3.5-4B): one unit, no LM head of its own.
    tied = arch_profile(registry.get("qwen3.5", "4B")).fsdp_units
    t, _ = _config("qwen3.5", "4B")
    assert tied["lm_head"] == 0 and tied["embed"] == t["vocab_size"] * t["hidden_size"]


def test_fsdp2_gradients_stay_sharded_over_accumulation():
    """B5: the engine reduce-scatters every micro-batch, so the gradients are 4T/W whatever the accumulation, and the
    only unsharded gradient is the one unit being reduced (in the buffers)."""
    hand = _qwen3vl_32b_by_hand()
    inventory = Inventory(gpu("H200-141GB"), 8, None)
    one = plan_run(_spec("qwen3vl", "32B", batch=8, cluster={"workers": 8, "strategy": "fsdp2"}), inventory)
    four = plan_run(_spec("qwen3vl", "32B", batch=32, cluster={"workers": 8, "strategy": "fsdp2"}), inventory)
    assert one.fits and four.fits and four.grad_accum > one.grad_accum == 1
    assert one.per_gpu_bytes.gradients == four.per_gpu_bytes.gradients
    # T: everything but the vision tower (27 blocks, about 1.2% of P) trains.
    assert four.per_gpu_bytes.gradients == pytest.approx(4 * (hand["total"] - hand["depth"] * hand["block"]) / 8,
                                                         rel=0.01)
    unsharded_grad_bound = 6 * max(hand["embed"], hand["layer"]) + 4 * 0.01 * hand["total"]
    assert four.per_gpu_bytes.other - FRAMEWORK_OVERHEAD < 2 * 0.01 * hand["total"] + 4 * hand["embed"] \
        + unsharded_grad_bound


def test_the_hybrid_mesh_always_matches_the_world_size():
    """B4: fsdp2-hybrid only on whole nodes; its mesh [workers // gpn, gpn] multiplies to the world size."""
    profile = arch_profile(registry.get("qwen2.5vl", "3B"))
    w = workload_of(_spec("qwen2.5vl", "3B", "LoRA"))
    sample = sample_shape(profile)
    for gpn in (2, 4, 8):
        inventory = Inventory(gpu("A100-80GB"), gpn, None)
        for workers in range(1, 41):
            layout = Layout("fsdp2-hybrid", workers, gpn, 1, False)
            if workers % gpn:
                with pytest.raises(VrayError, match="whole nodes"):
                    fsdp_settings(layout, w)
            else:
                assert hybrid_mesh(workers, gpn) == [workers // gpn, gpn]
            found = search(profile, w, sample, inventory, workers, workers=workers, only="fsdp2-hybrid")
            if found is None:
                assert workers % gpn or workers < 2 * gpn
                continue
            mesh = fsdp_settings(found.layout, w)["mesh"]
            assert mesh[0] * mesh[1] == workers and mesh[1] == gpn and mesh[0] >= 2
    # The review's case: an effective batch of 24 on 8-GPU nodes never gives a 12-worker (2, 8) mesh.
    plan = plan_run(_spec("qwen2.5vl", "3B", "LoRA", batch=24, cluster={"strategy": "fsdp2-hybrid"}),
                    Inventory(gpu("A100-80GB"), 8, None))
    assert plan.fits and plan.fsdp["mesh"] == [3, 8] and plan.num_workers == 24
    refused = plan_run(_spec("qwen2.5vl", "3B", "LoRA", batch=24, cluster={"workers": 12, "strategy": "fsdp2-hybrid"}),
                       Inventory(gpu("A100-80GB"), 8, None))
    assert not refused.fits and "whole nodes" in refused.reason


def test_moe_has_its_own_far_lower_mfu_and_prefers_engines_that_keep_experts_whole():
    """B8: sparse MoE plans assume their own MFU, zero3 at most 0.12 and well under dense; where a non-zero3 engine
    fits on as few GPUs, the plan takes it."""
    assert MOE_MFU["zero3"] <= 0.12 and MOE_MFU["zero3"] < MFU["zero3"] / 2
    assert all(MOE_MFU[s] < MFU[s] for s in MFU) and set(MOE_MFU) == set(MFU)
    inventory = Inventory(gpu("H100-80GB"), 8, 1)
    plan = plan_run(_spec("qwen3.5", "35B-A3B", "LoRA", batch=8, cluster={"workers": 2}), inventory)
    assert plan.fits and plan.strategy != "zero3"
    zero3 = plan_run(_spec("qwen3.5", "35B-A3B", "LoRA", batch=8, cluster={"workers": 2, "strategy": "zero3"}),
                     inventory)
    assert zero3.fits and zero3.estimate["step_seconds"] > plan.estimate["step_seconds"]
    # the table's figure, scaled by the micro-batch's efficiency (the same for both: the same tokens per micro-batch)
    efficiency = micro_batch_efficiency(int(zero3.estimate["micro_batch_tokens"]))
    assert zero3.estimate["mfu"] == round(MOE_MFU["zero3"] * efficiency, 3)
    assert "LlamaFactory#9374" in plan.assumptions["mfu_source"] and "Megatron-Bridge" in plan.assumptions["mfu_source"]
    dense = plan_run(_spec("qwen3vl", "32B", "LoRA", batch=8, cluster={"strategy": "zero3", "workers": 2}), inventory)
    efficiency = micro_batch_efficiency(int(dense.estimate["micro_batch_tokens"]))
    assert dense.estimate["mfu"] == round(MFU["zero3"] * efficiency, 3) and "NeMo" in dense.assumptions["mfu_source"]
    assert MFU["ddp"] >= 3 * MOE_MFU["ddp"]  # dense and MoE differ several-fold
    for name, size in (("qwen3.5", "35B-A3B"), ("qwen3vl", "30B-A3B")):
        for mode in ("LoRA", "Full"):
            for kind in ("A100-40GB", "H100-80GB"):
                chosen = plan_run(_spec(name, size, mode, batch=32), Inventory(gpu(kind), 8, None))
                assert chosen.fits and chosen.strategy not in ("zero3", "zero3-offload"), (name, mode, kind)
