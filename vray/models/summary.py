"""The `vray archs --json` list: one object per checkpoint, parameter counts from the meta device."""

from __future__ import annotations

from typing import Any

from vray.archs.registry import ARCHITECTURES, Architecture
from vray.models.params import param_counts


def arch_record(arch: Architecture) -> dict[str, Any]:
    """The contract object of one checkpoint."""
    counts = param_counts(arch)
    return {
        "name": arch.name,
        "size": arch.size,
        "repo_id": arch.repo_id,
        "model_type": arch.model_type,
        "transformers_class": arch.transformers_class,
        "min_transformers": arch.min_transformers,
        "lora_supported": arch.lora_supported,
        "lora_targets": list(arch.lora_targets),
        "vision_modules": list(arch.vision_modules),
        "projector_modules": list(arch.projector_modules),
        "box_convention": arch.box_convention,
        "moe": arch.is_moe,
        "gated": arch.gated,
        "recommended": arch.recommended,
        "verified": arch.verified,
        "assumed": sorted(arch.assumed),
        "assumed_why": arch.assumed,
        "source": arch.provenance.get("source", ""),
        "params": {"total": counts.total, "vision": counts.vision, "language": counts.language,
                   "active": counts.active, "lora": counts.lora},
    }


def archs_json() -> list[dict[str, Any]]:
    """Every checkpoint of the registry, in table order."""
    return [arch_record(a) for a in ARCHITECTURES]
