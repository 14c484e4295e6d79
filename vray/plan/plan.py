"""Plan: what the trainer runs (strategy, workers, batch split, placement), as `vray plan --json` prints it."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from vray.errors import VrayError
from vray.spec import RunSpec

STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "zero3-offload", "fsdp2", "fsdp2-hybrid")


@dataclass(frozen=True)
class MemoryBreakdown:
    """Predicted bytes per GPU."""

    weights: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    other: int = 0

    @property
    def total(self) -> int:
        """Sum of the parts."""
        return self.weights + self.gradients + self.optimizer + self.activations + self.other

    def to_dict(self) -> dict[str, int]:
        """The parts and their total."""
        return {**asdict(self), "total": self.total}


@dataclass(frozen=True)
class Plan:
    """How a run is executed; the trainer consumes it, nothing downstream re-derives it."""

    fits: bool
    strategy: str | None
    device: str  # "gpu" or "cpu"
    num_workers: int
    nodes: int
    gpus_per_node: int
    micro_batch: int
    grad_accum: int
    gradient_checkpointing: bool
    cpus_per_worker: int = 1
    gpu: str | None = None
    per_gpu_bytes: MemoryBreakdown | None = None
    capacity_bytes: int | None = None
    margin_bytes: int | None = None
    assumptions: dict[str, Any] = field(default_factory=dict)
    estimate: dict[str, float] | None = None
    deepspeed: dict[str, Any] | None = None
    fsdp: dict[str, Any] | None = None
    reason: str | None = None
    suggestions: tuple[str, ...] = ()

    @property
    def effective_batch(self) -> int:
        """Samples per optimizer step across all workers."""
        return self.micro_batch * self.grad_accum * self.num_workers

    @property
    def scaling_config(self) -> dict[str, Any]:
        """Keyword arguments of ray.train.ScalingConfig for this plan."""
        use_gpu = self.device == "gpu"
        resources: dict[str, float] = {"CPU": self.cpus_per_worker}
        if use_gpu:
            resources["GPU"] = 1
        out: dict[str, Any] = {"num_workers": self.num_workers, "use_gpu": use_gpu, "resources_per_worker": resources}
        # Pack a node before spanning nodes.
        out["placement_strategy"] = "PACK"
        return out

    def bundles(self) -> list[dict[str, float]]:
        """The placement-group bundles Ray Train reserves for this plan (one per worker)."""
        return [dict(self.scaling_config["resources_per_worker"]) for _ in range(self.num_workers)]

    def to_dict(self) -> dict[str, Any]:
        """The `vray plan --json` object."""
        out = {
            "fits": self.fits,
            "strategy": self.strategy,
            "device": self.device,
            "gpu": self.gpu,
            "num_workers": self.num_workers,
            "nodes": self.nodes,
            "gpus_per_node": self.gpus_per_node,
            "cpus_per_worker": self.cpus_per_worker,
            "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum,
            "effective_batch": self.effective_batch,
            "gradient_checkpointing": self.gradient_checkpointing,
            "per_gpu_bytes": self.per_gpu_bytes.to_dict() if self.per_gpu_bytes else None,
            "capacity_bytes": self.capacity_bytes,
            "margin_bytes": self.margin_bytes,
            "assumptions": self.assumptions,
            "estimate": self.estimate,
            "scaling_config": self.scaling_config,
        }
        if self.deepspeed is not None:
            out["deepspeed"] = self.deepspeed
        if self.fsdp is not None:
            out["fsdp"] = self.fsdp
        if not self.fits:
            out["reason"] = self.reason
            out["suggestions"] = list(self.suggestions)
        return out

    def to_json(self) -> str:
        """Indented JSON of `to_dict()`."""
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        """Read back what `to_dict()` wrote (plan.json of a run directory)."""
        mem = d.get("per_gpu_bytes")
        return cls(
            fits=d["fits"], strategy=d["strategy"], device=d.get("device", "gpu"), num_workers=d["num_workers"],
            nodes=d["nodes"], gpus_per_node=d["gpus_per_node"], micro_batch=d["micro_batch"],
            grad_accum=d["grad_accum"], gradient_checkpointing=d["gradient_checkpointing"],
            cpus_per_worker=d.get("cpus_per_worker", 1), gpu=d.get("gpu"),
            per_gpu_bytes=MemoryBreakdown(**{k: v for k, v in mem.items() if k != "total"}) if mem else None,
            capacity_bytes=d.get("capacity_bytes"), margin_bytes=d.get("margin_bytes"),
            assumptions=d.get("assumptions") or {}, estimate=d.get("estimate"), deepspeed=d.get("deepspeed"),
            fsdp=d.get("fsdp"), reason=d.get("reason"), suggestions=tuple(d.get("suggestions") or ()),
        )


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
        micro_batch=micro, grad_accum=accum, gradient_checkpointing=False, cpus_per_worker=per_worker,
        assumptions={"device": f"{workers} CPU worker(s) x {per_worker} CPU, gloo process group; no GPU memory model"},
    )
    return with_engine_settings(plan, spec, per_group)


def with_engine_settings(plan: Plan, spec: RunSpec, per_group: int) -> Plan:
    """The plan with the DeepSpeed config or FSDP2 settings its strategy needs."""
    from dataclasses import replace

    from vray.plan.memory import Layout
    from vray.plan.planner import deepspeed_config, fsdp_settings, workload_of
    from vray.plan.profile import arch_profile

    layout = Layout(plan.strategy, plan.num_workers, per_group, plan.micro_batch, plan.gradient_checkpointing)
    if plan.strategy.startswith("zero"):
        return replace(plan, deepspeed=deepspeed_config(layout, spec, arch_profile(spec.arch), workload_of(spec)))
    if plan.strategy.startswith("fsdp2"):
        return replace(plan, fsdp=fsdp_settings(layout, workload_of(spec)))
    return plan


def steps_per_epoch(num_samples: int, plan: Plan) -> int:
    """Optimizer steps in one pass over `num_samples` (the last batch wraps around, dropping nothing)."""
    return max(1, math.ceil(num_samples / plan.effective_batch))
