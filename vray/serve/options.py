"""How a deployment runs: replicas and autoscaling, per-replica resources, batching, adapters and request limits.

`ServeOptions.resolve(target, overrides)` merges the run's `serving` block with command-line or config-file
overrides and sizes a replica: CPU replicas take `replicaCpus`; GPU replicas take as many GPUs of the serving
kind as the bf16 (or 4-bit) weights plus the KV cache of a full batch need, so a 32B model spans several GPUs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from vray.errors import VrayError
from vray.infer.requests import Limits
from vray.infer.target import ServeTarget
from vray.spec import ServingBlock

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
KV_HEADROOM = 1.15  # activations, CUDA context and allocator slack on top of weights and KV cache


@dataclass(frozen=True)
class ReplicaSize:
    """Resources of one model-server replica and why."""

    num_cpus: float
    num_gpus: int
    gpu: str | None
    weights_bytes: int = 0
    kv_bytes: int = 0

    @property
    def tensor_parallel(self) -> int:
        """vLLM's tensor_parallel_size: a replica's GPUs (a power of two, so attention heads split evenly)."""
        return max(self.num_gpus, 1)

    def ray_actor_options(self) -> dict[str, Any]:
        """`ray_actor_options` of the ModelServer deployment."""
        opts: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            opts["num_gpus"] = self.num_gpus
            from vray.plan.gpus import CATALOG

            types = CATALOG[self.gpu].ray_accelerator_types if self.gpu in CATALOG else ()
            if types:
                opts["accelerator_type"] = types[0]
        return opts


def replica_size(target: ServeTarget, serving: ServingBlock) -> ReplicaSize:
    """GPUs per replica from weights plus a full batch of KV cache, on `serving.gpu` (CPU when none is set)."""
    if not serving.gpu:
        return ReplicaSize(num_cpus=serving.replicaCpus, num_gpus=0, gpu=None)
    from vray.plan.gpus import gpu as gpu_named
    from vray.plan.memory import base_weight_bytes, margin_bytes
    from vray.plan.profile import arch_profile

    kind = gpu_named(serving.gpu)
    profile = arch_profile(target.arch)
    # bf16 weights; a QLoRA adapter's base is 4-bit exactly as the planner counts it for training
    weights = base_weight_bytes(profile, 2, four_bit=target.quantization is not None)
    text = profile.text
    full_layers = sum(1 for k in text.layer_kinds if k == "full_attention") or text.layers
    kv_per_token = 2 * full_layers * text.kv_heads * text.head_dim * 2  # K and V, bf16
    kv = kv_per_token * serving.maxModelLen * serving.maxBatchSize
    usable = kind.memory_bytes - margin_bytes(kind.memory_bytes)
    need = int((weights + kv) * KV_HEADROOM)
    gpus = max(1, math.ceil(need / usable))
    # tensor parallelism splits attention heads evenly: round up to a divisor-friendly power of two
    tp = 1 << (gpus - 1).bit_length()
    if tp > 8:
        raise VrayError(
            f"serving {target.architecture} needs about {need / 2**30:.0f} GiB per replica ({weights / 2**30:.0f} GiB weights "
            f"+ {kv / 2**30:.0f} GiB KV cache), more than 8x {kind.name}; lower serving.maxModelLen or "
            "serving.maxBatchSize, quantize the base, or pick a larger GPU with serving.gpu"
        )
    return ReplicaSize(num_cpus=serving.replicaCpus, num_gpus=tp, gpu=kind.name, weights_bytes=weights, kv_bytes=kv)


@dataclass(frozen=True)
class ServeOptions:
    """Everything about a deployment besides what it serves."""

    serving: ServingBlock
    replica: ReplicaSize
    api_key: str | None = None
    allowed_image_hosts: tuple[str, ...] = ()
    adapters: dict[str, str] = field(default_factory=dict)  # extra adapter name -> run dir / checkpoint
    adapters_dir: str | None = None  # a folder (or s3:// prefix) whose sub-folders are runs of the same base

    @property
    def max_body_bytes(self) -> int:
        """Bytes one request body may have."""
        return int(self.serving.maxBodyMB * 1024 * 1024)

    @classmethod
    def resolve(cls, target: ServeTarget, serving: dict[str, Any] | None = None, **kwargs: Any) -> ServeOptions:
        """The run's serving block with `serving` overrides on top; the replica sized for it."""
        # None leaves the run's value, except for `gpu`, where it means "serve on CPU"
        given = {k: v for k, v in (serving or {}).items() if v is not None or k == "gpu"}
        merged = {**(target.serving.model_dump() if target.serving else {}), **given}
        try:
            block = ServingBlock(**merged)
        except Exception as exc:  # noqa: BLE001 - pydantic names the field
            raise VrayError(f"serving: {exc}") from None
        for name in kwargs.get("adapters") or {}:
            if not ADAPTER_NAME.match(name):
                raise VrayError(f"adapter name {name!r}: use letters, digits, '.', '_' and '-' only")
        kwargs["allowed_image_hosts"] = tuple(kwargs.get("allowed_image_hosts") or ())
        kwargs["adapters"] = dict(kwargs.get("adapters") or {})
        return cls(serving=block, replica=replica_size(target, block), **kwargs)

    @property
    def limits(self) -> Limits:
        """What one request may carry."""
        return Limits.of(self.serving)

    def autoscaling_config(self) -> dict[str, Any]:
        """Ray Serve `autoscaling_config` of the ModelServer deployment."""
        s = self.serving
        return {"min_replicas": s.minReplicas, "initial_replicas": max(s.minReplicas, 1), "max_replicas": s.maxReplicas,
                "target_ongoing_requests": s.targetOngoingRequests or s.maxBatchSize,
                "upscale_delay_s": s.upscaleDelayS, "downscale_delay_s": s.downscaleDelayS}

    def max_ongoing_requests(self) -> int:
        """Requests one replica accepts at once: enough to fill two batches."""
        return max(2 * self.serving.maxBatchSize, 4)

    def deployment_options(self) -> dict[str, Any]:
        """`.options(...)` of the ModelServer deployment (the same keys a Serve config's `deployments:` takes)."""
        return {"autoscaling_config": self.autoscaling_config(), "max_ongoing_requests": self.max_ongoing_requests(),
                "ray_actor_options": self.replica.ray_actor_options()}
