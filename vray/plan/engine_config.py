"""The engine settings a plan carries: the DeepSpeed config of a ZeRO plan, the FSDP2 settings of an fsdp2 plan."""

from __future__ import annotations

from typing import Any

from vray.errors import VrayError
from vray.plan.memory import Layout, Workload
from vray.plan.profile import ArchProfile
from vray.spec import RunSpec


def deepspeed_config(layout: Layout, spec: RunSpec, profile: ArchProfile, w: Workload) -> dict[str, Any]:
    """The DeepSpeed config of a ZeRO plan."""
    stage = {"zero1": 1, "zero2": 2, "zero3": 3, "zero3-offload": 3}[layout.strategy]
    accum = spec.hyperparameters.effective_batch // (layout.micro_batch * layout.workers)
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                            "reduce_bucket_size": 200_000_000}
    if stage < 3:
        zero["allgather_bucket_size"] = 200_000_000
    else:
        unit = profile.largest_gather_unit
        zero.update(stage3_prefetch_bucket_size=unit, stage3_max_live_parameters=2 * unit,
                    stage3_param_persistence_threshold=100_000, stage3_gather_16bit_weights_on_model_save=True)
    if layout.strategy == "zero3-offload":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": layout.micro_batch,
        "gradient_accumulation_steps": accum,
        "train_batch_size": spec.hyperparameters.effective_batch,
        "gradient_clipping": spec.hyperparameters.maxGradNorm,
        "bf16": {"enabled": w.precision == "BFloat16"},
        "fp16": {"enabled": w.precision == "Float16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": zero,
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }


def hybrid_mesh(workers: int, gpus_per_node: int) -> list[int]:
    """The fsdp2-hybrid mesh [replicas, shard]: whole nodes of `gpus_per_node`, so the product is the world size.
    A VrayError when the workers do not fill whole nodes (the planner never offers such a layout)."""
    if workers < 1 or gpus_per_node < 1 or workers % gpus_per_node:
        raise VrayError(f"fsdp2-hybrid shards within a node and replicates across nodes, so it needs whole nodes: "
                        f"{workers} workers do not fill nodes of {gpus_per_node}; use a multiple of {gpus_per_node} "
                        "workers (cluster.workers), or cluster.strategy: fsdp2")
    return [workers // gpus_per_node, gpus_per_node]


def fsdp_settings(layout: Layout, w: Workload) -> dict[str, Any]:
    """The FSDP2 settings of an fsdp2 / fsdp2-hybrid plan."""
    hybrid = layout.strategy == "fsdp2-hybrid"
    mesh = hybrid_mesh(layout.workers, layout.gpus_per_node) if hybrid else [layout.workers]
    return {
        "mesh": mesh,
        "mesh_dims": ["replicate", "shard"] if layout.strategy == "fsdp2-hybrid" else ["shard"],
        "reshard_after_forward": True,
        "param_dtype": {"BFloat16": "bfloat16", "Float16": "float16", "Float32": "float32"}[w.precision],
        "reduce_dtype": "float32",
        "shard_units": ["decoder layers", "vision blocks", "embed_tokens", "lm_head (with embed_tokens when tied)",
                        "root (vision patch embedding, projector, norms)"],
        "cpu_offload": False,
    }
