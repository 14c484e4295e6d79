"""The planner: choose GPUs, strategy, batch split, checkpointing, packing and placement for a run, or say what
would fit.

A plan fits when the predicted step peak per GPU and the load-time peak per GPU, each plus the margin
(5% of memory + 1 GiB), are within the GPU's memory, and the load-time peak of a node's ranks is within
the node's CPU memory. Activations are sized for the data: the longest sample the data check counted (its exact
tokens, with the most images a sample has), or one packed row of `pack_tokens`; an assumed sample only when no
data is at hand. The effective batch (batchSize x gradientAccumulation) is preserved as micro-batch x
accumulation x workers. Among plans that fit without CPU offload: on an inventory of known size (a cluster, this
machine, or `--nodes`) vray takes the fastest estimated step among the data-parallel widths that divide the
effective batch; on an open-ended inventory (as many nodes as needed) the fewest GPUs, then the fewest nodes, then
the fastest step. ZeRO-3 with CPU offload only when nothing else fits. Gradient checkpointing under `auto` is the
policy (off, every k-th layer, every layer) whose largest fitting micro-batch gives the fastest estimated step.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vray.archs import registry
from vray.errors import DataError, VrayError
from vray.plan.engine_config import deepspeed_config, fsdp_settings
from vray.plan.flops import count_flops, recomputed_share
from vray.plan.gpus import CATALOG, GPU, Inventory
from vray.plan.memory import (
    Estimate,
    Layout,
    SampleShape,
    Workload,
    cpu_estimate,
    data_sample_shape,
    estimate,
    packed_row,
    sample_shape,
)
from vray.plan.plan import Plan
from vray.plan.profile import ArchProfile, arch_profile, checkpoint_profile
from vray.spec import RunSpec

DEFAULT_DATASET_SAMPLES = 1000
# Assumed model-FLOPs utilisation per strategy: the share of the GPU's dense bf16 TFLOP/s a step achieves at a
# micro-batch of MFU_REFERENCE_TOKENS tokens (fewer tokens per micro-batch: see micro_batch_efficiency), counted on
# the FLOPs the step runs (recompute included). Dense models: NeMo AutoModel's performance summary reports Qwen2.5
# 7B LoRA on one H100 at 423 model TFLOP/s per GPU, 43% of 989 (GBS 32, MBS 2, 4096-token packed sequences, TE and
# Triton kernels; docs.nvidia.com/nemo/automodel/nightly/performance-summary.html, "Fine-Tuning (LoRA)
# Performance"). vray's ddp figure stays a little below that (0.40: SDPA or flash-attention, Liger where installed,
# no TransformerEngine); the sharded engines lose more to their gathers.
MFU = {"ddp": 0.40, "zero1": 0.38, "zero2": 0.36, "fsdp2-hybrid": 0.34, "fsdp2": 0.33, "zero3": 0.30,
       "zero3-offload": 0.08}
MFU_SOURCE = ("dense: NeMo AutoModel reports Qwen2.5-7B LoRA at 423 TFLOP/s on one H100 (43% of 989; MBS 2 x 4096 "
              "tokens, TE kernels; docs.nvidia.com/nemo/automodel/nightly/performance-summary.html); vray assumes 0.40 "
              "under ddp at 8192 tokens per micro-batch, less for sharded engines, to be calibrated on GPU "
              "(benchmarks/gpu_check.py)")
# Sparse MoE language models (routed experts: Qwen3-VL-30B-A3B, Qwen3.5-35B-A3B, ...), counted on the active
# parameters: several-fold below dense. Megatron-Bridge's verification card for Qwen3.6-35B-A3B LoRA on 16 H100s
# reports about 110 TFLOP/s per GPU (about 11% of 989) with expert parallelism and grouped GEMMs (the card's figure
# as quoted; its page was not found among the stored sources, unlike NeMo's table above); vray has no
# expert parallelism, so 0.11 is its figure for the engines that keep the experts whole on each GPU (ddp; Qwen
# supports its MoE fine-tuning on ZeRO-2, QwenLM/Qwen3-VL#1619) and less for sharded engines, which all-gather
# every expert of a layer (8 of 256 used per token) on the forward, the recompute and the backward (a field
# report: 166 s per step for Qwen3-VL-30B-A3B on 8x H100 under ZeRO-3, hiyouga/LlamaFactory#9374).
MOE_MFU = {"ddp": 0.11, "zero1": 0.105, "zero2": 0.10, "fsdp2-hybrid": 0.08, "fsdp2": 0.075, "zero3": 0.06,
           "zero3-offload": 0.02}
MOE_MFU_SOURCE = ("sparse MoE, on active parameters: Megatron-Bridge's verification card for Qwen3.6-35B-A3B LoRA on "
                  "16 H100s reports about 110 TFLOP/s per GPU (11%) with expert parallelism; vray assumes 0.11 where "
                  "experts stay whole (ddp), less where sharded engines gather them (zero3 0.06; field report of "
                  "166 s/step for Qwen3-VL-30B-A3B on 8x H100 under ZeRO-3, hiyouga/LlamaFactory#9374); to be "
                  "calibrated on GPU")
# The tables' figures hold at this many tokens per micro-batch (NeMo's MBS 2 x 4096); a micro-batch of n tokens
# runs at n / (n + MFU_HALF_TOKENS) of the rate, relative to the reference: small GEMMs leave the GPU idle, and
# every micro-batch pays its launches and its gradient hooks. MFU_HALF_TOKENS is an assumption, to be calibrated.
MFU_REFERENCE_TOKENS = 8192
MFU_HALF_TOKENS = 1024
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


@dataclass(frozen=True)
class DataSizes:
    """What the data check counted that the plan sizes for: the longest training sample's exact tokens (text and
    visual, as the model's processor encodes it) and where it is, the mean (for the time estimate), and the most
    images (or whether any video) one sample has."""

    max_tokens: int
    mean_tokens: float
    max_images: int
    video: bool
    longest: str  # the row of the longest sample, e.g. "train.jsonl:17"
    counted_with: str = "processor"  # "processor" (exact) or "estimated"

    def describe(self) -> str:
        how = "counted by the processor" if self.counted_with == "processor" else "estimated"
        return f"the data: its longest sample ({self.longest}, {self.max_tokens} tokens {how})"


def sample_of(spec: RunSpec, profile: ArchProfile, data: DataSizes | None = None) -> SampleShape:
    """The sample activations are sized for: the data's longest sample (with the most images a sample has, each at
    the media limits) when the data check has counted it, else the assumed sample the media limits imply."""
    media = spec.media_limits
    if data is not None:
        return data_sample_shape(profile, data.max_tokens, data.max_images, data.describe(), media.minPixels,
                                 media.maxPixels, media.maxFrames, data.video)
    return sample_shape(profile, media.minPixels, media.maxPixels, media.maxFrames)


def flops_per_sample(profile: ArchProfile, w: Workload, sample: SampleShape, gradient_checkpointing: bool,
                     checkpoint_every: int = 1) -> float:
    """Training FLOPs one sample costs the hardware (vray.plan.flops: its model FLOPs plus, under gradient
    checkpointing, the recomputed layers' forward)."""
    return count_flops(profile, w, sample, checkpoint_every if gradient_checkpointing else 0).hardware


def micro_batch_efficiency(tokens: int) -> float:
    """The share of the MFU table's rate a micro-batch of `tokens` tokens runs at (1 at MFU_REFERENCE_TOKENS and
    above)."""
    rate = lambda n: n / (n + MFU_HALF_TOKENS)  # noqa: E731
    return min(1.0, rate(max(1, tokens)) / rate(MFU_REFERENCE_TOKENS))


def step_estimate(profile: ArchProfile, w: Workload, layout: Layout, sample: SampleShape, gpu: GPU,
                  effective_batch: int, samples: int, epochs: int, time_sample: SampleShape | None = None
                  ) -> dict[str, float]:
    """Step time, total hours and GPU-hours at the assumed MFU of the strategy, scaled by the micro-batch's
    efficiency (tokens per micro-batch: micro-batch x the sized sample, or one packed row) and paying for what
    checkpointing recomputes. The FLOPs are those of `time_sample` (the data's mean sample, when packed) or of the
    sized sample (padded micro-batches pay for their padding)."""
    mfu = mfu_table(profile)[layout.strategy]
    if layout.nodes > 1 and layout.strategy not in ("ddp", "zero1", "zero2", "fsdp2-hybrid"):
        mfu *= CROSS_NODE_FACTOR
    if gpu.interconnect == "pcie" and layout.strategy != "ddp":
        mfu *= PCIE_SHARDED_FACTOR
    micro_tokens = layout.micro_batch * sample.sequence
    mfu *= micro_batch_efficiency(micro_tokens)
    flops = effective_batch * flops_per_sample(profile, w, time_sample or sample, layout.gradient_checkpointing,
                                               layout.checkpoint_every)
    step_s = flops / (layout.workers * gpu.tflops * 1e12 * mfu)
    steps = epochs * math.ceil(samples / effective_batch)
    hours = steps * step_s / 3600
    return {"step_seconds": round(step_s, 4), "steps": steps, "hours": round(hours, 4),
            "gpu_hours": round(hours * layout.workers, 4), "mfu": round(mfu, 3), "micro_batch_tokens": micro_tokens,
            "recompute_share": round(recomputed_share(profile.text.layers, layout.checkpoint_k), 3)}


def mfu_table(profile: ArchProfile) -> dict[str, float]:
    """The assumed MFU per strategy: MOE_MFU for sparse MoE language models, else MFU."""
    return MOE_MFU if profile.text.moe else MFU


# The every:k settings `auto` tries besides off (0) and every layer (1).
AUTO_CHECKPOINT_EVERY = (8, 4, 3, 2)


def checkpoint_choices(setting: str) -> tuple[int, ...]:
    """cluster.gradientCheckpointing -> the k the search tries (0: off, 1: every layer, k: every k-th layer)."""
    if setting == "auto":
        return (0, *AUTO_CHECKPOINT_EVERY, 1)
    if setting.startswith("every:"):
        return (int(setting.split(":", 1)[1]),)
    return {"on": (1,), "off": (0,)}[setting]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _not_offered(strategy: str, workers: int, gpus_per_node: int, w: Workload) -> str | None:
    """Why a strategy is not a layout for this many workers (None: it is)."""
    if strategy == "fsdp2-hybrid" and (workers < 2 * gpus_per_node or workers % gpus_per_node):
        # Within one node it is fsdp2; its [nodes, GPUs per node] mesh needs whole nodes to match the world size.
        return (f"fsdp2-hybrid needs whole nodes: {workers} worker(s) are not a multiple (two or more) of "
                f"{gpus_per_node} GPUs per node")
    if strategy.startswith("fsdp2") and w.precision == "Float16":
        return "fsdp2 does not run Float16 (it needs loss scaling, which vray does with DDP and DeepSpeed)"
    if strategy != "ddp" and workers == 1 and strategy != "zero3-offload":
        return f"{strategy} has nothing to shard over on one worker"
    return None


def _why_not(profile: ArchProfile, w: Workload, sample: SampleShape, inv: Inventory, effective: int,
             workers: int | None, only: str | None) -> str:
    """What stops the closest layout: the strategy with the smallest overshoot at micro-batch 1 with gradient
    checkpointing, on the forced worker count or the most workers the batch and inventory allow."""
    counts = [n for n in _divisors(effective) if n <= inv.max_gpus]
    n = workers or (max(counts) if counts else 1)
    strategies = [s for s in STRATEGIES_BY_MODE[w.mode] + OFFLOAD[w.mode] if only is None or s == only]
    closest: tuple[int, str, Estimate] | None = None
    refused: list[str] = []
    for strategy in strategies:
        why = _not_offered(strategy, n, inv.gpus_per_node, w)
        if why:
            refused.append(why)
            continue
        est = estimate(profile, w, Layout(strategy, n, inv.gpus_per_node, 1, True), sample, inv.gpu.memory_bytes,
                       inv.host_memory_per_gpu)
        over = max(est.memory.total, est.load.per_gpu) + est.margin - est.capacity
        if closest is None or over < closest[0]:
            closest = (over, strategy, est)
    if closest is None:
        return "; " + "; ".join(refused) if refused else ""
    _, strategy, est = closest
    failures = est.failures()
    if not failures:
        return ""
    return (f"; closest: {strategy} on {n} GPU(s), micro-batch 1, gradient checkpointing on: " + "; ".join(failures))


@dataclass(frozen=True)
class _Candidate:
    layout: Layout
    est: Estimate
    step_seconds: float


def _best_for_workers(profile: ArchProfile, w: Workload, sample: SampleShape, inv: Inventory, workers: int,
                      per_worker: int, strategies: tuple[str, ...], effective: int, samples: int,
                      epochs: int, checkpointing: str = "auto", max_micro: int | None = None,
                      time_sample: SampleShape | None = None) -> _Candidate | None:
    """The fastest (strategy, checkpointing, micro-batch) on this many workers: for each strategy and checkpointing
    policy its largest micro-batch that fits, then the fastest estimated step (ties: less recompute)."""
    found: list[tuple[float, float, _Candidate]] = []
    micros = sorted((m for m in _divisors(per_worker) if max_micro is None or m <= max_micro), reverse=True)
    for strategy in strategies:
        if _not_offered(strategy, workers, inv.gpus_per_node, w):
            continue
        for k in checkpoint_choices(checkpointing):
            for micro in micros:
                layout = Layout(strategy, workers, inv.gpus_per_node, micro, k > 0, max(k, 1))
                est = estimate(profile, w, layout, sample, inv.gpu.memory_bytes, inv.host_memory_per_gpu)
                if est.fits:
                    secs = step_estimate(profile, w, layout, sample, inv.gpu, effective, samples, epochs,
                                         time_sample)["step_seconds"]
                    found.append((secs, recomputed_share(profile.text.layers, k), _Candidate(layout, est, secs)))
                    break
    return min(found, key=lambda f: f[:2])[2] if found else None


def search(profile: ArchProfile, w: Workload, sample: SampleShape, inv: Inventory, effective: int,
           workers: int | None = None, samples: int = DEFAULT_DATASET_SAMPLES, epochs: int = 1,
           allow_offload: bool = True, only: str | None = None, checkpointing: str = "auto",
           fastest: bool = False, max_micro: int | None = None, time_sample: SampleShape | None = None
           ) -> _Candidate | None:
    """The layout that fits, or None. Without offload: with `fastest`, the fastest estimated step among the worker
    counts that divide the effective batch (within the inventory); otherwise the fewest GPUs (then the fastest
    layout at that count). With offload (only when nothing else fits), the fastest. `checkpointing` is
    `cluster.gradientCheckpointing` (auto: the fastest policy that fits; on / off / every:k force it);
    `max_micro` caps the micro-batch (1 for a packed row)."""
    if workers is not None:
        counts = [workers]
    else:
        counts = [n for n in _divisors(effective) if n <= inv.max_gpus]
    strategies = tuple(s for s in STRATEGIES_BY_MODE[w.mode] if only is None or s == only)
    offload = tuple(s for s in OFFLOAD[w.mode] if only is None or s == only)

    def best(n: int, engines: tuple[str, ...]) -> _Candidate | None:
        return _best_for_workers(profile, w, sample, inv, n, effective // n, engines, effective, samples, epochs,
                                 checkpointing, max_micro, time_sample)

    found: list[_Candidate] = []
    for n in counts:
        c = best(n, strategies)
        if c is not None and not fastest:
            return c
        if c is not None:
            found.append(c)
    if found:
        return min(found, key=lambda c: (c.step_seconds, c.layout.workers))
    if not (allow_offload and offload):
        return None
    # Offload is the last resort; every GPU it spreads over shortens the CPU round trips, so take the fastest.
    offloaded = [c for c in (best(n, offload) for n in counts) if c is not None]
    return min(offloaded, key=lambda c: c.step_seconds) if offloaded else None


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
        "mfu": mfu_table(profile), "mfu_source": MOE_MFU_SOURCE if profile.text.moe else MFU_SOURCE,
        "mfu_micro_batch": f"the table's rate at {MFU_REFERENCE_TOKENS} tokens per micro-batch; n tokens run at "
                           f"n/(n+{MFU_HALF_TOKENS}) of it, relative to {MFU_REFERENCE_TOKENS}",
        "logits": "label-only loss: the label positions' hidden rows and their gradient (all tokens counted), plus "
                  "loss_chunk_rows(vocabulary) rows of fp32 logits, their fp32 gradient and the matmul output at a "
                  "time; never the full-vocabulary logits",
        "lora_adapters": "compute dtype under autocast over fp32 master adapters: no fp32 input copies",
        "checkpointing": "every:k recomputes layers 0, k, 2k, ... (ceil(L/k) of L; on = every layer): they keep "
                         "only their input, the others all they save; the recompute costs their forward again",
        "load": "load peak per GPU (+ the margin) and per node (ranks x per-rank host bytes, within the node's CPU "
                "memory) while the model loads: the whole model at the load dtype + its largest tensor in fp32 for "
                "ddp / zero1 / zero2; the ZeRO-3 partition + the largest module gathered; FSDP2 shards + one "
                "256 MiB read chunk",
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
        if search(sp, sw, sample_of(spec, sp), inv, effective) is not None:
            out.append(f"architecture.size: {size} fits this inventory")
            break
    if (spec.media_limits.maxPixels or 1024 * 1024) > 512 * 512:
        out.append("smaller images (media.maxPixels) shorten the sequence and its activations")
    return out


def _layout_summary(c: _Candidate, effective: int, timing: dict[str, float], pack_tokens: int | None) -> dict[str, Any]:
    layout = c.layout
    return {"strategy": layout.strategy, "num_workers": layout.workers, "nodes": layout.nodes,
            "micro_batch": layout.micro_batch, "grad_accum": effective // (layout.micro_batch * layout.workers),
            "gradient_checkpointing": layout.gradient_checkpointing, "checkpoint_every": layout.checkpoint_every,
            "pack_tokens": pack_tokens, "per_gpu_total_bytes": c.est.memory.total, "step_seconds": timing["step_seconds"],
            "hours": timing["hours"], "gpu_hours": timing["gpu_hours"]}


def plan_run(spec: RunSpec, inventory: Inventory, dataset: tuple[int, str] | None = None,
             data: DataSizes | None = None) -> Plan:
    """The plan for a spec on an inventory; `fits` is False (with reason and suggestions) when nothing fits.
    `dataset` is (training samples, where the number comes from), counted by the caller
    (`vray.data.io.count_rows`); without it the estimate assumes DEFAULT_DATASET_SAMPLES. `data` is what the data
    check counted (the longest sample and the most images per sample); without it an assumed sample is sized.

    Packing (data.packTokens unset): micro-batches are packed rows of micro-batch x the longest sample's tokens
    (`pack_tokens`), which never splits a sample; data.packTokens: P sizes one row of P tokens (micro-batch 1 of
    memory) and is refused when the longest sample is longer; 0 pads micro-batches instead.
    On an inventory of known size the plan is the fastest layout (`fastest`), on an open-ended one the fewest
    GPUs (`minimum`); both are in the plan."""
    arch = spec.arch
    profile = arch_profile(arch)
    w = workload_of(spec)
    sample = sample_of(spec, profile, data)
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
    pack = spec.data.packTokens  # None: the planner's choice; 0: no packing; P: rows of P tokens
    sized, max_micro, time_sample = sample, None, None
    if pack:  # a row of `pack` tokens: memory for one row (micro-batch 1)
        if sample.sequence > pack:
            raise DataError(f"data.packTokens: {pack} is shorter than the longest sample ({sample.sized_from}); one "
                            f"packed row must hold a whole sample: set data.packTokens to at least {sample.sequence}, "
                            "0 for no packing, or shorten the sample (media.maxPixels, data.maxTokens)")
        sized, max_micro = packed_row(sample, pack), 1
    if pack is None or pack:  # packed: the work is the data's mean sample, not the longest one padded
        mean = data.mean_tokens if data is not None else sample.sequence
        time_sample = packed_row(sample, max(1, round(mean)))
    kwargs = dict(samples=samples[0], epochs=epochs, only=spec.cluster.strategy,
                  checkpointing=spec.cluster.gradientCheckpointing, max_micro=max_micro, time_sample=time_sample)
    minimum = search(profile, w, sized, inventory, effective, workers, **kwargs)
    fastest = search(profile, w, sized, inventory, effective, workers, fastest=True, **kwargs) if minimum else None
    if minimum is None or fastest is None:
        where = inventory.describe()
        reason = f"no layout of {arch.display} ({w.mode}, {w.precision}) fits {where} with the effective batch {effective}"
        reason += _why_not(profile, w, sized, inventory, effective, workers, spec.cluster.strategy)
        return _not_fitting(spec, inventory, profile, sized, samples, reason,
                            _suggestions(spec, profile, w, sized, inventory))
    best = fastest if inventory.nodes is not None else minimum
    layouts = {}
    for name, c in (("minimum", minimum), ("fastest", fastest)):
        t = step_estimate(profile, w, c.layout, sized, gpu, effective, samples[0], epochs, time_sample)
        layouts[name] = _layout_summary(c, effective, t, _pack_tokens(pack, c.layout, sized))
    layout, est = best.layout, best.est
    timing = step_estimate(profile, w, layout, sized, gpu, effective, samples[0], epochs, time_sample)
    per_worker = effective // layout.workers
    micro = layout.micro_batch
    if pack:  # the samples of a micro-batch that one row holds at the longest sample's length
        micro = max(d for d in _divisors(per_worker) if d <= max(1, pack // max(1, sample.sequence)))
    engine_layout = replace(layout, micro_batch=micro)  # the engines' batch split is the plan's
    return Plan(
        fits=True, strategy=layout.strategy, device="gpu", num_workers=layout.workers, nodes=layout.nodes,
        gpus_per_node=inventory.gpus_per_node, micro_batch=micro, grad_accum=per_worker // micro,
        gradient_checkpointing=layout.gradient_checkpointing, cpus_per_worker=spec.cluster.cpusPerWorker or 2,
        gpu=gpu.name, per_gpu_bytes=est.memory, capacity_bytes=est.capacity, margin_bytes=est.margin,
        assumptions=_assumptions(spec, profile, sized, samples, est), estimate=timing,
        deepspeed=deepspeed_config(engine_layout, spec, profile, w) if layout.strategy.startswith("zero") else None,
        fsdp=fsdp_settings(engine_layout, w) if layout.strategy.startswith("fsdp2") else None,
        load_peak_bytes=est.load, checkpoint_every=layout.checkpoint_every,
        pack_tokens=_pack_tokens(pack, layout, sized), layouts=layouts,
    )


def _pack_tokens(pack: int | None, layout: Layout, sized: SampleShape) -> int | None:
    """The plan's packed-row budget: data.packTokens, else micro-batch x the sized sample's tokens; None for 0."""
    if pack == 0:
        return None
    return pack or layout.micro_batch * sized.sequence


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


def cpu_plan(spec: RunSpec, cpus_available: int | None = None, sample: SampleShape | None = None,
             profile: ArchProfile | None = None) -> Plan:
    """A plan over CPU workers (gloo), for machines and clusters without GPUs: DDP, or the engine
    `cluster.strategy` names (ZeRO and FSDP2 run on CPU too; fsdp2-hybrid over `cluster.nodes` groups).
    Its memory figures are per worker (with_cpu_memory): for `sample` (default: the spec's media limits) and
    `profile` (default: the local checkpoint `model.source` names, else the registry checkpoint)."""
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
        micro_batch=micro, grad_accum=accum, gradient_checkpointing=bool(spec.cluster.checkpoint_every),
        cpus_per_worker=per_worker, checkpoint_every=max(1, spec.cluster.checkpoint_every or 1),
        pack_tokens=spec.data.packTokens or None,
        assumptions={"device": f"{workers} CPU worker(s) x {per_worker} CPU, gloo process group; no GPU memory model"},
    )
    return with_engine_settings(with_cpu_memory(plan, spec, per_group, sample, profile), spec, per_group)


def cpu_profile(spec: RunSpec) -> ArchProfile:
    """The profile a CPU plan sizes: the local checkpoint `model.source` names (tiny and real-shaped test checkpoints
    keep the registry's architecture but not its widths), else the registry checkpoint."""
    source = spec.model.source
    if source and spec.arch.native:
        if source.startswith("tiny:"):
            from vray.models.tiny import tiny_checkpoint

            return checkpoint_profile(tiny_checkpoint(source.split(":", 1)[1]), spec.arch)
        folder = Path(source).expanduser()
        if "://" not in source and (folder / "config.json").is_file():
            try:
                return checkpoint_profile(folder, spec.arch)
            except (ValueError, KeyError, TypeError):  # a config transformers cannot build: plan the registry's
                pass
    return arch_profile(spec.arch)


def with_cpu_memory(plan: Plan, spec: RunSpec, per_group: int, sample: SampleShape | None = None,
                    profile: ArchProfile | None = None) -> Plan:
    """A CPU plan with its memory model filled in: `per_gpu_bytes` is one worker's step peak and `load_peak_bytes`
    one worker's load peak (per_gpu) and all workers' (per_host), as anonymous host memory, without margins
    (vray.plan.memory.cpu_estimate). A CPU plan has no capacity to fit, so `fits` stays True."""
    prof = profile or cpu_profile(spec)
    shape = sample or sample_of(spec, prof)
    layout = Layout(plan.strategy, plan.num_workers, per_group, plan.micro_batch, plan.gradient_checkpointing,
                    plan.checkpoint_every)
    memory, load, parts = cpu_estimate(prof, workload_of(spec), layout, shape)
    assumptions = {**plan.assumptions, **shape.describe(), "activation_parts": parts,
                   "memory_model": "per CPU worker, anonymous memory beyond the process's fixed overhead: the step "
                                   "peak (per_gpu_bytes) and the load peak (load_peak_bytes.per_gpu; per_host: all "
                                   "workers), without margins",
                   "params": {"total": prof.total_params}}
    return replace(plan, per_gpu_bytes=memory, load_peak_bytes=load, assumptions=assumptions)


def with_engine_settings(plan: Plan, spec: RunSpec, per_group: int) -> Plan:
    """The plan with the DeepSpeed config or FSDP2 settings its strategy needs."""
    layout = Layout(plan.strategy, plan.num_workers, per_group, plan.micro_batch, plan.gradient_checkpointing)
    if plan.strategy.startswith("zero"):
        return replace(plan, deepspeed=deepspeed_config(layout, spec, arch_profile(spec.arch), workload_of(spec)))
    if plan.strategy.startswith("fsdp2"):
        return replace(plan, fsdp=fsdp_settings(layout, workload_of(spec)))
    return plan


