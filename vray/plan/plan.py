"""Plan: what the trainer runs (strategy, workers, batch split, placement), as `vray plan --json` prints it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from vray.plan.memory import LoadPeak, MemoryBreakdown


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
    load_peak_bytes: LoadPeak | None = None  # while loading the model: per GPU (per worker on CPU) and per node
    checkpoint_every: int = 1  # with gradient_checkpointing: every k-th decoder layer is recomputed
    pack_tokens: int | None = None  # padding-free packing: tokens of one packed row (None: padded micro-batches)
    # GPU plans: the fewest-GPU layout ("minimum") and the fastest one ("fastest"), each summarised
    layouts: dict[str, dict[str, Any]] = field(default_factory=dict)

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
            "checkpoint_every": self.checkpoint_every,
            "pack_tokens": self.pack_tokens,
            "per_gpu_bytes": self.per_gpu_bytes.to_dict() if self.per_gpu_bytes else None,
            "load_peak_bytes": self.load_peak_bytes.to_dict() if self.load_peak_bytes else None,
            "capacity_bytes": self.capacity_bytes,
            "margin_bytes": self.margin_bytes,
            "assumptions": self.assumptions,
            "estimate": self.estimate,
            "scaling_config": self.scaling_config,
        }
        out.update(self.layouts)
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
        load = d.get("load_peak_bytes")
        return cls(
            fits=d["fits"], strategy=d["strategy"], device=d.get("device", "gpu"), num_workers=d["num_workers"],
            nodes=d["nodes"], gpus_per_node=d["gpus_per_node"], micro_batch=d["micro_batch"],
            grad_accum=d["grad_accum"], gradient_checkpointing=d["gradient_checkpointing"],
            cpus_per_worker=d.get("cpus_per_worker", 1), gpu=d.get("gpu"),
            per_gpu_bytes=MemoryBreakdown(**{k: v for k, v in mem.items() if k != "total"}) if mem else None,
            capacity_bytes=d.get("capacity_bytes"), margin_bytes=d.get("margin_bytes"),
            assumptions=d.get("assumptions") or {}, estimate=d.get("estimate"), deepspeed=d.get("deepspeed"),
            fsdp=d.get("fsdp"), reason=d.get("reason"), suggestions=tuple(d.get("suggestions") or ()),
            load_peak_bytes=LoadPeak(load["per_gpu"], load["per_host"]) if load else None,
            checkpoint_every=d.get("checkpoint_every", 1), pack_tokens=d.get("pack_tokens"),
            layouts={k: d[k] for k in ("minimum", "fastest") if d.get(k)},
        )
