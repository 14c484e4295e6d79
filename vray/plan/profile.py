"""What the memory model needs to know of an architecture, read off the model transformers builds.

Parameters and Linear shapes come from instantiating the checkpoint's real config on the meta device
(or from a loaded model, which the CPU checks use); layer dimensions come from the same config.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache, cached_property, lru_cache
from pathlib import Path

from torch import nn

from vray.archs.registry import Architecture
from vray.archs.vision import VisionDims, vision_dims


@dataclass(frozen=True)
class Tensor:
    """One parameter tensor (tied parameters appear once)."""

    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Linear:
    """One nn.Linear module."""

    name: str
    in_features: int
    out_features: int
    bias: bool


@dataclass(frozen=True)
class TextDims:
    """The language model's dimensions."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    layer_kinds: tuple[str, ...]  # "full_attention" | "linear_attention" per layer
    moe: bool = False
    num_experts: int = 0
    experts_per_tok: int = 0
    moe_intermediate: int = 0
    shared_intermediate: int = 0
    attn_output_gate: bool = False
    linear_key_heads: int = 0
    linear_value_heads: int = 0
    linear_key_dim: int = 0
    linear_value_dim: int = 0


@dataclass(frozen=True, eq=False)  # identity hash: profiles key the memory model's caches
class ArchProfile:
    """Parameters, Linear shapes and dimensions of one checkpoint."""

    key: str
    tensors: tuple[Tensor, ...]
    linears: tuple[Linear, ...]
    vision_prefixes: tuple[str, ...]
    projector_prefixes: tuple[str, ...]
    lm_prefix: str
    text: TextDims
    vision: VisionDims
    layer_params: tuple[int, ...]  # parameters of each decoder layer
    stored_bytes: int = 4  # bytes per element in the checkpoint's files (registry checkpoints: bf16, as published)

    def role(self, name: str) -> str:
        """'projector', 'vision', 'lm_head' or 'language' for a parameter or module name."""
        if name.startswith(tuple(p + "." for p in self.projector_prefixes)):
            return "projector"
        if name.startswith(tuple(p + "." for p in self.vision_prefixes)):
            return "vision"
        if name.split(".")[-2:-1] == ["lm_head"] or name.startswith(("lm_head", "llm.lm_head")):
            return "lm_head"
        return "language"

    @cached_property
    def total_params(self) -> int:
        return sum(t.numel for t in self.tensors)

    @cached_property
    def _params_by_role(self) -> dict[str, int]:
        out = {"vision": 0, "projector": 0, "lm_head": 0, "language": 0}
        for t in self.tensors:
            out[self.role(t.name)] += t.numel
        return out

    def params_of(self, role: str) -> int:
        """Parameters whose role is `role`."""
        return self._params_by_role[role]

    @cached_property
    def expert_params(self) -> int:
        """Fused routed-expert parameters (MoE)."""
        return sum(t.numel for t in self.tensors if ".mlp.experts." in t.name)

    @cached_property
    def active_language_params(self) -> int:
        """Language-model parameters used per token (routed experts scaled by top-k / experts)."""
        lang = self.params_of("language") + self.params_of("lm_head")
        if not self.text.moe:
            return lang
        experts = self.expert_params
        return lang - experts + experts * self.text.experts_per_tok // self.text.num_experts

    @cached_property
    def largest_gather_unit(self) -> int:
        """The most parameters one sharded unit all-gathers at once (a decoder layer, or the embedding / LM head)."""
        embed = max((t.numel for t in self.tensors if "embed_tokens" in t.name), default=0)
        head = max((t.numel for t in self.tensors if self.role(t.name) == "lm_head"), default=0)
        return max(max(self.layer_params, default=0), embed, head)

    @cached_property
    def largest_tensor(self) -> int:
        """Elements of the largest parameter tensor (what a load holds in transit, one tensor at a time)."""
        return max((t.numel for t in self.tensors), default=0)

    @cached_property
    def largest_module(self) -> int:
        """The most parameters one module holds directly (its own tensors, not its children's): what ZeRO-3 gathers
        in full while loading that module's weights."""
        by_module: dict[str, int] = {}
        for t in self.tensors:
            owner = t.name.rsplit(".", 1)[0]
            by_module[owner] = by_module.get(owner, 0) + t.numel
        return max(by_module.values(), default=0)

    @cached_property
    def fsdp_units(self) -> dict[str, int]:
        """Parameters of FSDP2's units: the largest decoder layer, the input embedding, the LM head (0 when tied to
        the embedding, which is then one unit), the largest vision block (the tower's longest repeated stack), and the
        root: what none of them owns (vision patch embedding, merger, final norms), gathered by the root unit."""
        embed = sum(t.numel for t in self.tensors if ".embed_tokens." in f".{t.name}" and self.role(t.name) == "language")
        head = self.params_of("lm_head")
        blocks: dict[str, dict[int, int]] = {}
        for prefix in self.vision_prefixes:
            stack = re.compile(re.escape(prefix) + r"\.(.*?)\.(\d+)\.")
            for t in self.tensors:
                m = stack.match(t.name)
                if m:
                    per = blocks.setdefault(f"{prefix}.{m.group(1)}", {})
                    per[int(m.group(2))] = per.get(int(m.group(2)), 0) + t.numel
        longest = max(blocks.values(), key=len, default={})
        vision_block = max(longest.values(), default=0)
        root = self.total_params - sum(self.layer_params) - sum(longest.values()) - embed - head
        return {"decoder_layer": max(self.layer_params, default=0), "embed": embed, "lm_head": head,
                "vision_block": vision_block, "root": max(root, 0)}


def _text_dims(cfg: dict) -> TextDims:
    t = cfg.get("text_config") or cfg
    layers = t["num_hidden_layers"]
    heads = t["num_attention_heads"]
    head_dim = t.get("head_dim") or t["hidden_size"] // heads
    kinds = tuple(t.get("layer_types") or ["full_attention"] * layers)
    moe = bool(t.get("num_experts"))
    return TextDims(
        hidden=t["hidden_size"], layers=layers, heads=heads, kv_heads=t.get("num_key_value_heads", heads),
        head_dim=head_dim, intermediate=t.get("intermediate_size", 0), vocab=t["vocab_size"], layer_kinds=kinds,
        moe=moe, num_experts=t.get("num_experts") or 0, experts_per_tok=t.get("num_experts_per_tok") or 0,
        moe_intermediate=t.get("moe_intermediate_size") or 0,
        shared_intermediate=t.get("shared_expert_intermediate_size") or 0,
        attn_output_gate=cfg.get("model_type", "").startswith("qwen3_5"),
        linear_key_heads=t.get("linear_num_key_heads") or 0, linear_value_heads=t.get("linear_num_value_heads") or 0,
        linear_key_dim=t.get("linear_key_head_dim") or 0, linear_value_dim=t.get("linear_value_head_dim") or 0,
    )


def profile_model(model: nn.Module, arch: Architecture, config: dict | None = None) -> ArchProfile:
    """The profile of a built model (meta device or loaded) of a registry architecture."""
    cfg = config if config is not None else arch.config
    tensors = tuple(Tensor(n, tuple(p.shape)) for n, p in model.named_parameters())
    linears = tuple(Linear(n, m.in_features, m.out_features, m.bias is not None)
                    for n, m in model.named_modules() if isinstance(m, nn.Linear))
    layer_re = re.compile(re.escape(arch.language_model_prefix) + r"\.layers\.(\d+)\.")
    per_layer: dict[int, int] = {}
    for t in tensors:
        m = layer_re.match(t.name)
        if m:
            per_layer[int(m.group(1))] = per_layer.get(int(m.group(1)), 0) + t.numel
    return ArchProfile(
        key=arch.key, tensors=tensors, linears=linears, vision_prefixes=arch.vision_modules,
        projector_prefixes=arch.projector_modules, lm_prefix=arch.language_model_prefix,
        text=_text_dims(cfg), vision=vision_dims(cfg), layer_params=tuple(per_layer[i] for i in sorted(per_layer)),
    )


@cache
def arch_profile(arch: Architecture) -> ArchProfile:
    """The profile of a registry checkpoint from its real config on the meta device."""
    from dataclasses import replace

    from vray.models.params import build_meta_model

    return replace(profile_model(build_meta_model(arch), arch), stored_bytes=2)


def checkpoint_profile(folder: Path, arch: Architecture) -> ArchProfile:
    """The profile of a checkpoint on disk (its config.json built on the meta device): what a CPU plan of a local
    checkpoint holds, whose widths and depth may differ from the registry checkpoint `arch` it is shaped like."""
    config = folder / "config.json"
    return _checkpoint_profile(str(folder.resolve()), config.stat().st_mtime_ns, arch)


@lru_cache(maxsize=16)
def _checkpoint_profile(folder: str, mtime: int, arch: Architecture) -> ArchProfile:
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vray.models import register_families

    register_families()
    raw = json.loads((Path(folder) / "config.json").read_text())
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(folder))
    return profile_model(model, arch, raw)
