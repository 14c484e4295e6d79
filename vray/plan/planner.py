"""The planner: choose GPUs, strategy, batch split and placement for a run, or say what would fit.

A plan fits when the predicted peak per GPU plus the margin (5% of memory + 1 GiB) is within the GPU's
memory. Among plans that fit without CPU offload vray takes the fewest GPUs, then the fewest nodes, then
the fastest estimated step; ZeRO-3 with CPU offload only when nothing else fits. The effective batch
(batchSize x gradientAccumulation) is preserved as micro-batch x accumulation x workers; gradient
checkpointing is switched on only when it is needed to fit (or is faster at the larger micro-batch it allows).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Any

from vray.archs import registry
from vray.errors import VrayError
from vray.plan.engine_config import deepspeed_config, fsdp_settings
from vray.plan.gpus import CATALOG, GPU, Inventory
from vray.plan.memory import Estimate, Layout, SampleShape, Workload, estimate, sample_shape
from vray.plan.plan import Plan
from vray.plan.profile import ArchProfile, arch_profile
from vray.spec import RunSpec

DEFAULT_DATASET_SAMPLES = 1000
# Assumed model-FLOPs utilisation per strategy (share of the GPU's dense bf16 TFLOP/s a step achieves).
MFU = {"ddp": 0.40, "zero1": 0.38, "zero2": 0.36, "fsdp2-hybrid": 0.34, "fsdp2": 0.33, "zero3": 0.30,
       "zero3-offload": 0.08}
CROSS_NODE_FACTOR = 0.85  # sharded all-gathers across nodes (not for fsdp2-hybrid, whose gathers stay in a node)
PCIE_SHARDED_FACTOR = 0.7  # sharded strategies over PCIe-only GPUs
STRATEGIES_BY_MODE = {
    "full": ("ddp", "zero1", "zero2", "fsdp2", "fsdp2-hybrid", "zero3"),
    "lora": ("ddp", "zero2", "fsdp2", "fsdp2-hybrid", "zero3"),
    "qlora": ("ddp",),  # the 4-bit base is replicated; only the adapter trains
}
OFFLOAD = {"full": ("zero3-offload",), "lora": ("zero3-offload",), "qlora": ()}


def workload_of(spec: RunSpec) -> Workload:
    """The memory model's view of a spec."""
    arch = spec.arch
    mode = "full" if spec.trainingMode.type == "Full" else ("qlora" if spec.quantization.enabled else "lora")
    regex = arch.lora_target_regex(spec.lora.targets) if mode != "full" and arch.lora_supported else None
    return Workload(mode=mode, precision=spec.compute.precisionType, optimizer=spec.hyperparameters.optimizer,
                    lora_rank=spec.lora.rank, lora_dropout=spec.lora.dropout, lora_regex=regex,
                    train_vision=mode == "full" and spec.full.trainVision, lora_scope=spec.lora.scope,
                    lora_experts=mode != "full" and spec.lora.experts)


def sample_of(spec: RunSpec, profile: ArchProfile) -> SampleShape:
    """The sample shape a spec's media limits imply."""
    return sample_shape(profile, spec.media.minPixels, spec.media.maxPixels, spec.media.maxFrames)




def flops_per_sample(profile: ArchProfile, w: Workload, sample: SampleShape, gradient_checkpointing: bool) -> float:
    """Training FLOPs of one sample: 2 x active parameters per token forward, backward 2x (full) or 1x (frozen
    weights: input gradients only), one more forward under gradient checkpointing; attention scores and the
    vision tower on top."""
    t = profile.text
    seq = sample.sequence
    lm_params = profile.active_language_params
    if profile.params_of("lm_head") == 0:  # tied: the embedding matrix is multiplied once more as the LM head
        lm_params += t.hidden * t.vocab
    full_layers = sum(1 for k in t.layer_kinds if k == "full_attention")
    forward = seq * 2 * lm_params + full_layers * 2 * seq * seq * t.heads * t.head_dim
    backward = (2.0 if w.mode == "full" else 1.0) * forward
    recompute = forward if gradient_checkpointing else 0.0
    vision = 2 * (profile.params_of("vision") + profile.params_of("projector")) * sample.vision_patches
    return forward + backward + recompute + vision * (3 if w.vision_trains else 1)


def step_estimate(profile: ArchProfile, w: Workload, layout: Layout, sample: SampleShape, gpu: GPU,
                  effective_batch: int, samples: int, epochs: int) -> dict[str, float]:
    """Step time, total hours and GPU-hours at the assumed MFU of the strategy."""
    mfu = MFU[layout.strategy]
    if layout.nodes > 1 and layout.strategy not in ("ddp", "zero1", "zero2", "fsdp2-hybrid"):
        mfu *= CROSS_NODE_FACTOR
    if gpu.interconnect == "pcie" and layout.strategy != "ddp":
        mfu *= PCIE_SHARDED_FACTOR
    flops = effective_batch * flops_per_sample(profile, w, sample, layout.gradient_checkpointing)
    step_s = flops / (layout.workers * gpu.tflops * 1e12 * mfu)
    steps = epochs * math.ceil(samples / effective_batch)
    hours = steps * step_s / 3600
    return {"step_seconds": round(step_s, 4), "steps": steps, "hours": round(hours, 4),
            "gpu_hours": round(hours * layout.workers, 4), "mfu": round(mfu, 3)}


# cluster.gradientCheckpointing -> the settings the search tries, in order (without it first: it costs a forward).
CHECKPOINTING_CHOICES = {"auto": (False, True), "on": (True,), "off": (False,)}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class _Candidate:
    layout: Layout
    est: Estimate
    step_seconds: float


def _best_for_workers(profile: ArchProfile, w: Workload, sample: SampleShape, inv: Inventory, workers: int,
                      per_worker: int, strategies: tuple[str, ...], effective: int, samples: int,
                      epochs: int, checkpointing: str = "auto") -> _Candidate | None:
    nodes = math.ceil(workers / inv.gpus_per_node)
    found: list[_Candidate] = []
    for strategy in strategies:
        if strategy == "fsdp2-hybrid" and nodes < 2:
            continue  # within one node it is fsdp2
        if strategy.startswith("fsdp2") and w.precision == "Float16":
            continue  # fp16 needs loss scaling, which vray does with DDP and DeepSpeed
        if strategy != "ddp" and workers == 1 and strategy != "zero3-offload":
            continue  # nothing to shard over
        for gc in CHECKPOINTING_CHOICES[checkpointing]:
            for micro in sorted(_divisors(per_worker), reverse=True):
                layout = Layout(strategy, workers, inv.gpus_per_node, micro, gc)
                est = estimate(profile, w, layout, sample, inv.gpu.memory_bytes, inv.host_memory_per_gpu)
                if est.fits:
                    secs = step_estimate(profile, w, layout, sample, inv.gpu, effective, samples, epochs)["step_seconds"]
                    found.append(_Candidate(layout, est, secs))
                    break
    return min(found, key=lambda c: c.step_seconds) if found else None


def search(profile: ArchProfile, w: Workload, sample: SampleShape, inv: Inventory, effective: int,
           workers: int | None = None, samples: int = DEFAULT_DATASET_SAMPLES, epochs: int = 1,
           allow_offload: bool = True, only: str | None = None, checkpointing: str = "auto") -> _Candidate | None:
    """The cheapest layout that fits, or None: the fewest GPUs without offload; with offload, the fastest.
    `checkpointing` is `cluster.gradientCheckpointing`: auto tries without it first, on / off force it."""
    if workers is not None:
        counts = [workers]
    else:
        counts = [n for n in _divisors(effective) if n <= inv.max_gpus]
    strategies = tuple(s for s in STRATEGIES_BY_MODE[w.mode] if only is None or s == only)
    offload = tuple(s for s in OFFLOAD[w.mode] if only is None or s == only)
    for n in counts:
        best = _best_for_workers(profile, w, sample, inv, n, effective // n, strategies, effective, samples, epochs,
                                 checkpointing)
        if best is not None:
            return best
    if not (allow_offload and offload):
        return None
    # Offload is the last resort; every GPU it spreads over shortens the CPU round trips, so take the fastest.
    offloaded = [_best_for_workers(profile, w, sample, inv, n, effective // n, offload, effective, samples, epochs,
                                   checkpointing) for n in counts]
    found = [c for c in offloaded if c is not None]
    return min(found, key=lambda c: c.step_seconds) if found else None


def min_gpus_ignoring_batch(profile: ArchProfile, w: Workload, sample: SampleShape, inv: Inventory) -> int | None:
    """The fewest GPUs of this kind that hold the run without CPU offload at micro-batch 1 (the effective batch
    set to match): 1, 2, 4, ... up to a node, then whole nodes."""
    n = 1
    while n <= inv.max_gpus:
        if search(profile, w, sample, inv, effective=n, workers=n, allow_offload=False) is not None:
            return n
        n = n * 2 if n < inv.gpus_per_node else n + inv.gpus_per_node
    return None


def _assumptions(spec: RunSpec, profile: ArchProfile, sample: SampleShape, samples: tuple[int, str],
                 est: Estimate | None) -> dict[str, Any]:
    arch = spec.arch
    out: dict[str, Any] = {
        **sample.describe(),
        "dataset_samples": samples[0], "dataset_samples_from": samples[1],
        "params": {"total": profile.total_params, "vision": profile.params_of("vision") + profile.params_of("projector"),
                   "language": profile.params_of("language") + profile.params_of("lm_head"),
                   "active_language": profile.active_language_params},
        "margin": "5% of GPU memory + 1 GiB (CUDA context, NCCL, fragmentation)",
        "offload_host_memory": "80% of the node's CPU memory per GPU (catalog: a usual 8-GPU cloud node)",
        "framework_overhead": "256 MiB per GPU, plus the engine's buffers, counted in 'other'",
        "mfu": MFU, "logits": "tokens x vocabulary x 12 bytes",
    }
    if arch.assumed:
        out["assumed_config_fields"] = sorted(arch.assumed)
    if est is not None:
        out["activation_parts"] = est.activation_parts
        if est.cpu:
            out.update(est.cpu)
    return out


def _suggestions(spec: RunSpec, profile: ArchProfile, w: Workload, sample: SampleShape, inv: Inventory) -> list[str]:
    out: list[str] = []
    effective = spec.hyperparameters.effective_batch
    need = min_gpus_ignoring_batch(profile, w, sample, Inventory(inv.gpu, inv.gpus_per_node, None))
    if need is not None and need > effective:
        out.append(f"the run needs {need} x {inv.gpu.name} but the effective batch ({effective}) splits over at most "
                   f"{effective} workers: set batchSize x gradientAccumulation to a multiple of {need}")
    if need is not None and (inv.nodes and need > inv.max_gpus):
        out.append(f"{need} x {inv.gpu.name} ({math.ceil(need / inv.gpus_per_node)} nodes of {inv.gpus_per_node}) would fit")
    for bigger in CATALOG.values():
        if bigger.memory_bytes <= inv.gpu.memory_bytes:
            continue
        n = min_gpus_ignoring_batch(profile, w, sample, Inventory(bigger, inv.gpus_per_node, inv.nodes))
        if n is not None:
            out.append(f"{n} x {bigger.name} would fit")
            break
    if w.mode == "full" and spec.arch.lora_supported:
        lora = Workload("lora", w.precision, w.optimizer, spec.lora.rank, spec.lora.dropout,
                        spec.arch.lora_target_regex(spec.lora.targets))
        if search(profile, lora, sample, inv, effective) is not None:
            out.append("trainingMode.type: LoRA fits this inventory")
    if w.mode in ("full", "lora") and spec.arch.lora_supported:
        qlora = Workload("qlora", w.precision, w.optimizer, spec.lora.rank, spec.lora.dropout,
                         spec.arch.lora_target_regex(spec.lora.targets))
        if search(profile, qlora, sample, inv, effective) is not None:
            out.append("LoRA with quantization.enabled: true (NF4) fits this inventory")
    for size in registry.sizes_of(spec.architecture.name):
        smaller = registry.get(spec.architecture.name, size)
        if smaller.key == spec.arch.key or "-A" in size:
            continue
        sp = arch_profile(smaller)
        if sp.total_params >= profile.total_params:
            continue
        sw = workload_of(spec.model_copy(update={"architecture": spec.architecture.model_copy(update={"size": size})}))
        if search(sp, sw, sample_shape(sp, spec.media.minPixels, spec.media.maxPixels, spec.media.maxFrames),
                  inv, effective) is not None:
            out.append(f"architecture.size: {size} fits this inventory")
            break
    if spec.media.maxPixels is None or spec.media.maxPixels > 512 * 512:
        out.append("smaller images (media.maxPixels) shorten the sequence and its activations")
    return out


def plan_run(spec: RunSpec, inventory: Inventory, dataset: tuple[int, str] | None = None) -> Plan:
    """The plan for a spec on an inventory; `fits` is False (with reason and suggestions) when nothing fits.
    `dataset` is (training samples, where the number comes from), counted by the caller
    (`vray.data.io.count_rows`); without it the estimate assumes DEFAULT_DATASET_SAMPLES."""
    arch = spec.arch
    profile = arch_profile(arch)
    w = workload_of(spec)
    sample = sample_of(spec, profile)
    samples = dataset or (DEFAULT_DATASET_SAMPLES, "assumed (no local training data to count)")
    effective = spec.hyperparameters.effective_batch
    epochs = spec.hyperparameters.epochs
    gpu = inventory.gpu
    if w.precision == "BFloat16" and not gpu.bf16:
        return _not_fitting(spec, inventory, profile, sample, samples,
                            f"{gpu.name} has no bfloat16 support", ["compute.precisionType: Float16 (or Float32)"])
    workers = spec.cluster.workers
    if workers is not None:
        if effective % workers:
            raise VrayError(
                f"cluster.workers: {workers} does not divide the effective batch (batchSize x gradientAccumulation = "
                f"{effective}); the plan keeps the effective batch, so pick a divisor of {effective}"
            )
        if workers > inventory.max_gpus:
            return _not_fitting(spec, inventory, profile, sample, samples,
                                f"cluster.workers asks for {workers} GPUs but the inventory has {inventory.max_gpus}",
                                [f"at most {inventory.max_gpus} workers"])
    best = search(profile, w, sample, inventory, effective, workers, samples[0], epochs, only=spec.cluster.strategy,
                  checkpointing=spec.cluster.gradientCheckpointing)
    if best is None:
        where = inventory.describe()
        reason = f"no layout of {arch.display} ({w.mode}, {w.precision}) fits {where} with the effective batch {effective}"
        return _not_fitting(spec, inventory, profile, sample, samples, reason,
                            _suggestions(spec, profile, w, sample, inventory))
    layout, est = best.layout, best.est
    timing = step_estimate(profile, w, layout, sample, gpu, effective, samples[0], epochs)
    accum = effective // (layout.micro_batch * layout.workers)
    return Plan(
        fits=True, strategy=layout.strategy, device="gpu", num_workers=layout.workers, nodes=layout.nodes,
        gpus_per_node=inventory.gpus_per_node, micro_batch=layout.micro_batch, grad_accum=accum,
        gradient_checkpointing=layout.gradient_checkpointing, cpus_per_worker=spec.cluster.cpusPerWorker or 2,
        gpu=gpu.name, per_gpu_bytes=est.memory, capacity_bytes=est.capacity, margin_bytes=est.margin,
        assumptions=_assumptions(spec, profile, sample, samples, est), estimate=timing,
        deepspeed=deepspeed_config(layout, spec, profile, w) if layout.strategy.startswith("zero") else None,
        fsdp=fsdp_settings(layout, w) if layout.strategy.startswith("fsdp2") else None,
    )


def _not_fitting(spec: RunSpec, inventory: Inventory, profile: ArchProfile, sample: SampleShape,
                 samples: tuple[int, str], reason: str, suggestions: list[str]) -> Plan:
    return Plan(
        fits=False, strategy=None, device="gpu", num_workers=0, nodes=0, gpus_per_node=inventory.gpus_per_node,
        micro_batch=0, grad_accum=0, gradient_checkpointing=False, gpu=inventory.gpu.name,
        capacity_bytes=inventory.gpu.memory_bytes, assumptions=_assumptions(spec, profile, sample, samples, None),
        reason=reason, suggestions=tuple(suggestions),
    )


def placement(plan: Plan, node_gpus: list[int]) -> list[int]:
    """Node index of each worker when the plan's bundles are packed onto nodes with these free GPU counts;
    a VrayError before anything starts when they do not fit."""
    order = sorted(range(len(node_gpus)), key=lambda i: -node_gpus[i])
    free = list(node_gpus)
    out: list[int] = []
    for _ in range(plan.num_workers):
        slot = next((i for i in order if free[i] > 0), None)
        if slot is None:
            break
        free[slot] -= 1
        out.append(slot)
    used_nodes = len(set(out))
    if len(out) < plan.num_workers or used_nodes > plan.nodes:
        raise VrayError(
            f"the plan needs {plan.num_workers} GPU(s) on {plan.nodes} node(s) of {plan.gpus_per_node}; the cluster has "
            f"{sum(node_gpus)} free GPU(s) on {len(node_gpus)} node(s) ({', '.join(str(g) for g in node_gpus) or 'none'}); "
            "add nodes, or plan for this cluster with --from-cluster"
        )
    return out


def split_batch(effective: int, workers: int, max_micro: int | None = None) -> tuple[int, int]:
    """(micro_batch, grad_accum) with micro x accum x workers == effective; a VrayError when impossible."""
    if effective % workers:
        raise VrayError(
            f"the effective batch (hyperparameters.batchSize x gradientAccumulation = {effective}) does not split "
            f"over {workers} workers; use a worker count that divides it, or change batchSize"
        )
    per_worker = effective // workers
    cap = min(per_worker, max_micro or per_worker)
    micro = max(d for d in range(1, cap + 1) if per_worker % d == 0)
    return micro, per_worker // micro


def cpu_plan(spec: RunSpec, cpus_available: int | None = None) -> Plan:
    """A plan over CPU workers (gloo), for machines and clusters without GPUs: DDP, or the engine
    `cluster.strategy` names (ZeRO and FSDP2 run on CPU too; fsdp2-hybrid over `cluster.nodes` groups)."""
    cpus = cpus_available or os.cpu_count() or 1
    per_worker = spec.cluster.cpusPerWorker or 1
    workers = spec.cluster.workers or max(1, min(2, cpus // per_worker))
    strategy = spec.cluster.strategy or "ddp"
    if spec.compute.precisionType == "Float16":
        raise VrayError(
            "compute.precisionType: Float16 training needs a GPU (CPU kernels lack fp16 loss scaling); "
            "use BFloat16 or Float32 on CPU workers"
        )
    if spec.quantization.enabled and strategy != "ddp":
        raise VrayError(f"quantization.enabled: 4-bit (QLoRA) weights are replicated, not sharded; "
                        f"use cluster.strategy: ddp (got {strategy})")
    effective = spec.hyperparameters.effective_batch
    micro, accum = split_batch(effective, workers, max_micro=spec.hyperparameters.batchSize)
    groups = spec.cluster.nodes or (2 if strategy == "fsdp2-hybrid" else 1)
    if workers % groups:
        raise VrayError(f"cluster.nodes: {workers} workers do not split into {groups} groups of equal size")
    per_group = workers // groups
    plan = Plan(
        fits=True, strategy=strategy, device="cpu", num_workers=workers, nodes=groups, gpus_per_node=0,
        micro_batch=micro, grad_accum=accum, gradient_checkpointing=spec.cluster.gradientCheckpointing == "on",
        cpus_per_worker=per_worker,
        assumptions={"device": f"{workers} CPU worker(s) x {per_worker} CPU, gloo process group; no GPU memory model"},
    )
    return with_engine_settings(plan, spec, per_group)


def with_engine_settings(plan: Plan, spec: RunSpec, per_group: int) -> Plan:
    """The plan with the DeepSpeed config or FSDP2 settings its strategy needs."""
    layout = Layout(plan.strategy, plan.num_workers, per_group, plan.micro_batch, plan.gradient_checkpointing)
    if plan.strategy.startswith("zero"):
        return replace(plan, deepspeed=deepspeed_config(layout, spec, arch_profile(spec.arch), workload_of(spec)))
    if plan.strategy.startswith("fsdp2"):
        return replace(plan, fsdp=fsdp_settings(layout, workload_of(spec)))
    return plan


