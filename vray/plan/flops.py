"""Training FLOPs of one sample, by part: what model FLOPs utilisation (MFU), hardware FLOPs utilisation (HFU) and
the common 6·N·T figure each count. The planner's step estimate and the throughput benchmarks use this one count.

The convention (README, "Benchmarks"), per sample of T tokens of which S are scored (carry a label):
- language model, forward: 2 x its matmul parameters per token (the decoder layers, MoE routed experts at
  top-k / experts; embeddings are a lookup and not counted), plus the LM head at the S scored positions only (the
  objective needs no logits elsewhere);
- attention, forward: causal self-attention 2·T²·heads·head_dim per full-attention layer (QKᵀ and AV over the
  causal half); Gated DeltaNet layers 6·T·value_heads·key_dim·value_dim (the state's read, update and output);
- backward: frozen weights (LoRA, QLoRA) need input gradients only (1x their forward), trained ones weight
  gradients too (2x); attention's backward is 2x its forward whatever trains;
- LoRA adapters: 2·r·(in + out) per token per adapted Linear forward, and as much again for the input gradient
  and for the weight gradient;
- vision tower: 2 x its parameters per patch (the projector per visual token) plus full attention over each
  image's patches (4·P²·hidden per block; windowed blocks are counted as full), forward; backward only when
  something in it trains;
- recompute (gradient checkpointing: ceil(L / k) of L decoder layers run their forward twice) counts for HFU only.
MFU counts `model` (no recompute), HFU counts `hardware`; `six_nt` is 6 x N x T with N the language model's
parameters per token (embeddings and head included): the figure commonly quoted for full fine-tuning, which
overstates LoRA's work (it credits weight gradients LoRA never computes).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache

from vray.archs.registry import lora_selection
from vray.plan.memory import SampleShape, Workload
from vray.plan.profile import ArchProfile


@dataclass(frozen=True)
class FlopCount:
    """One sample's training FLOPs by part (see the module's convention)."""

    base_forward: float  # language-model matmuls (the head at the scored positions)
    base_backward: float  # their input gradients, plus weight gradients where they train
    attention_forward: float
    attention_backward: float
    adapters: float  # LoRA forward, input gradient and weight gradient
    vision_forward: float  # vision tower and projector
    vision_backward: float  # only where something in them trains
    recompute: float  # the checkpointed decoder layers' second forward (HFU only)
    six_nt: float  # 6 x N x T, the common full-fine-tuning figure

    @property
    def model(self) -> float:
        """Model FLOPs: what MFU counts (no recompute)."""
        return (self.base_forward + self.base_backward + self.attention_forward + self.attention_backward
                + self.adapters + self.vision_forward + self.vision_backward)

    @property
    def hardware(self) -> float:
        """Hardware FLOPs: what HFU counts (the recompute too)."""
        return self.model + self.recompute

    def __add__(self, other: FlopCount) -> FlopCount:
        return FlopCount(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values(), strict=True)))

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "model": self.model, "hardware": self.hardware}


def recomputed_share(layers: int, every: int) -> float:
    """Share of the decoder layers recomputed when every `every`-th one is checkpointed (0: none, 1: all)."""
    return 0.0 if every <= 0 or layers <= 0 else math.ceil(layers / every) / layers


def _embedding_params(profile: ArchProfile) -> int:
    """Language-model embedding-table parameters (a lookup, not a matmul)."""
    return sum(t.numel for t in profile.tensors if "embed_tokens" in t.name and profile.role(t.name) == "language")


def _vision_lookup_params(profile: ArchProfile) -> int:
    """Vision position-embedding tables (lookups)."""
    return sum(t.numel for t in profile.tensors if profile.role(t.name) == "vision"
               and ("pos_embed" in t.name or "position_embedding" in t.name))


@lru_cache(maxsize=1024)
def _adapter_widths(profile: ArchProfile, w: Workload) -> dict[str, float]:
    """Sum over adapted Linears of r·(in + out), by the tokens they run on: 'language', 'vision' (patches),
    'projector' (visual tokens), 'lm_head' (scored positions)."""
    out = {"language": 0.0, "vision": 0.0, "projector": 0.0, "lm_head": 0.0}
    if w.mode not in ("lora", "qlora"):
        return out
    selection = lora_selection(w.lora_regex or "", w.lora_scope, profile.projector_prefixes, profile.vision_prefixes)
    for lin in profile.linears:
        if selection.adapts(lin.name):
            out[profile.role(lin.name)] += w.lora_rank * (lin.in_features + lin.out_features)
    if w.lora_experts and profile.text.num_experts:  # fused [experts, in, out]: top-k of them per token
        share = profile.text.experts_per_tok / profile.text.num_experts
        for t in profile.tensors:
            if ".mlp.experts." in t.name and len(t.shape) == 3:
                e, a, b = t.shape
                out["language"] += w.lora_rank * e * (a + b) * share
    return out


def count_flops(profile: ArchProfile, w: Workload, sample: SampleShape, checkpoint_every: int = 0,
                scored_tokens: int | None = None) -> FlopCount:
    """Training FLOPs of one sample of `sample`'s shape (its exact tokens, visual tokens and patches), with
    `scored_tokens` positions carrying a label (None: all of them) and every `checkpoint_every`-th decoder layer
    recomputed (0: no checkpointing)."""
    t = profile.text
    seq = sample.sequence
    scored = seq if scored_tokens is None else min(scored_tokens, seq)
    head = profile.params_of("lm_head") or t.hidden * t.vocab  # tied: the embedding matrix is the head
    body = profile.active_language_params - profile.params_of("lm_head") - _embedding_params(profile)
    body_forward = 2.0 * body * seq
    base_forward = body_forward + 2.0 * head * scored
    base_backward = (2.0 if w.mode == "full" else 1.0) * base_forward
    full_layers = sum(1 for k in t.layer_kinds if k == "full_attention")
    linear_layers = sum(1 for k in t.layer_kinds if k == "linear_attention")
    attention_forward = (full_layers * 2.0 * seq * seq * t.heads * t.head_dim
                         + linear_layers * 6.0 * seq * t.linear_value_heads * t.linear_key_dim * t.linear_value_dim)
    widths = _adapter_widths(profile, w)
    adapter_forward = 2.0 * (widths["language"] * seq + widths["vision"] * sample.vision_patches
                             + widths["projector"] * sample.visual_tokens + widths["lm_head"] * scored)
    v = profile.vision
    patches = sample.vision_patches
    slices = (sample.images or max(1, sample.frames // max(1, v.temporal_patch))) if patches else 0
    vision_linear = 2.0 * (profile.params_of("vision") - _vision_lookup_params(profile)) * patches
    vision_attention = 4.0 * v.depth * v.hidden * patches * patches / slices if slices else 0.0
    projector = 2.0 * profile.params_of("projector") * sample.visual_tokens
    vision_trains = w.vision_trains
    vision_linear_grads = (2.0 if w.mode == "full" and w.train_vision else 1.0) if vision_trains else 0.0
    projector_grads = (1.0 if w.mode == "full" else 0.0) + (1.0 if vision_trains else 0.0)
    vision_backward = (vision_linear * vision_linear_grads + vision_attention * (2.0 if vision_trains else 0.0)
                       + projector * projector_grads)
    layer_forward = body_forward + attention_forward + 2.0 * widths["language"] * seq
    return FlopCount(
        base_forward=base_forward, base_backward=base_backward, attention_forward=attention_forward,
        attention_backward=2.0 * attention_forward, adapters=3.0 * adapter_forward,
        vision_forward=vision_linear + vision_attention + projector, vision_backward=vision_backward,
        recompute=recomputed_share(t.layers, checkpoint_every) * layer_forward,
        six_nt=6.0 * profile.active_language_params * seq,
    )
