"""Exact parameter counts by building each checkpoint's model from its real config on the meta device (no download):
the layout vray builds, vray's own classes included."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cache

import torch
from torch import nn

from vray.archs.registry import Architecture


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of one checkpoint as transformers builds it."""

    total: int
    vision: int  # vision tower + projector
    language: int  # language model + LM head (counted once when tied)
    active: int  # parameters used per token: total for dense models, routed experts scaled by top-k / experts
    lora: int  # LoRA parameters at the default rank on the default targets (0 when LoRA is refused)
    experts: int = 0  # routed-expert parameters (MoE only)
    layers: int = 0  # decoder layers of the language model

    def to_dict(self) -> dict[str, int]:
        """The counts as a plain dict."""
        return asdict(self)


def build_meta_model(arch: Architecture) -> nn.Module:
    """The checkpoint's model with every tensor on the meta device (shapes only, no memory)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vray.models import register_families

    register_families()
    cfg = arch.config
    with torch.device("meta"):
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        return AutoModelForImageTextToText.from_config(config)


def _unique_params(module: nn.Module, prefix: str = "") -> dict[str, nn.Parameter]:
    return {f"{prefix}{n}": p for n, p in module.named_parameters()}


def _lora_params(model: nn.Module, arch: Architecture, rank: int) -> int:
    selection = arch.lora_selection()
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and selection.adapts(name):
            total += rank * (module.in_features + module.out_features)
    return total


def _expert_params(model: nn.Module) -> tuple[int, int, int]:
    """(routed-expert parameters, experts per layer, experts used per token) of an MoE model."""
    text_cfg = getattr(model.config, "text_config", model.config)
    n_exp = getattr(text_cfg, "num_experts", None)
    if not n_exp:
        return 0, 0, 0
    total = 0
    for name, p in model.named_parameters():
        # Fused routed experts: mlp.experts.<param> with a leading experts dimension (shared experts excluded).
        if ".mlp.experts." in name:
            total += p.numel()
    return total, n_exp, text_cfg.num_experts_per_tok


def count_params(model: nn.Module, arch: Architecture, lora_rank: int = 16) -> ParamCounts:
    """Total, vision, language, active and default-LoRA counts of a built (meta or real) model."""
    params = _unique_params(model)
    total = sum(p.numel() for p in params.values())
    vision_prefixes = tuple(m + "." for m in arch.vision_modules + arch.projector_modules)
    vision = sum(p.numel() for n, p in params.items() if n.startswith(vision_prefixes))
    experts, n_exp, top_k = _expert_params(model)
    active = total - experts + (experts * top_k // n_exp if n_exp else 0)
    lora = _lora_params(model, arch, lora_rank) if arch.lora_supported else 0
    layers = getattr(getattr(model.config, "text_config", model.config), "num_hidden_layers", 0)
    return ParamCounts(total=total, vision=vision, language=total - vision, active=active, lora=lora,
                       experts=experts, layers=layers)


@cache
def param_counts(arch: Architecture) -> ParamCounts:
    """Parameter counts of a registry checkpoint, from its real config on the meta device."""
    return count_params(build_meta_model(arch), arch)
