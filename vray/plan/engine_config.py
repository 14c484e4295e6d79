"""The engine settings a plan carries: the DeepSpeed config of a ZeRO plan, the FSDP2 settings of an fsdp2 plan."""

from __future__ import annotations

from typing import Any

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


def fsdp_settings(layout: Layout, w: Workload) -> dict[str, Any]:
    """The FSDP2 settings of an fsdp2 / fsdp2-hybrid plan."""
    mesh = [layout.nodes, layout.gpus_per_node] if layout.strategy == "fsdp2-hybrid" else [layout.workers]
    return {
        "mesh": mesh,
        "mesh_dims": ["replicate", "shard"] if layout.strategy == "fsdp2-hybrid" else ["shard"],
        "reshard_after_forward": True,
        "param_dtype": {"BFloat16": "bfloat16", "Float16": "float16", "Float32": "float32"}[w.precision],
        "reduce_dtype": "float32",
        "shard_units": ["decoder layers", "vision blocks", "root (embeddings, LM head, projector)"],
        "cpu_offload": False,
    }
