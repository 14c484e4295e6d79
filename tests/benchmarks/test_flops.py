"""vray.plan.flops on a shape small enough to count by hand: what MFU, HFU and 6·N·T each count."""

from __future__ import annotations

import pytest

from vray.archs.vision import VisionDims
from vray.plan.flops import count_flops
from vray.plan.memory import SampleShape, Workload
from vray.plan.planner import flops_per_sample
from vray.plan.profile import ArchProfile, Linear, Tensor, TextDims

LM = "model.language_model"


def _profile() -> ArchProfile:
    text = TextDims(hidden=8, layers=2, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=32,
                    layer_kinds=("full_attention", "linear_attention"), linear_key_heads=1, linear_value_heads=2,
                    linear_key_dim=4, linear_value_dim=4)
    tensors = (
        Tensor(f"{LM}.embed_tokens.weight", (32, 8)),  # a lookup: not counted
        Tensor(f"{LM}.layers.0.self_attn.q_proj.weight", (8, 8)),
        Tensor(f"{LM}.layers.1.mlp.up_proj.weight", (16, 8)),
        Tensor("lm_head.weight", (32, 8)),
        Tensor("model.visual.blocks.0.attn.qkv.weight", (18, 6)),
        Tensor("model.visual.pos_embed.weight", (4, 6)),  # a lookup: not counted
        Tensor("model.visual.merger.fc.weight", (8, 24)),
    )
    linears = (Linear(f"{LM}.layers.0.self_attn.q_proj", 8, 8, False), Linear(f"{LM}.layers.1.mlp.up_proj", 8, 16, False),
               Linear("lm_head", 8, 32, False), Linear("model.visual.blocks.0.attn.qkv", 6, 18, False),
               Linear("model.visual.merger.fc", 24, 8, False))
    return ArchProfile("hand", tensors, linears, ("model.visual",), ("model.visual.merger",), LM, text,
                       VisionDims("qwen", 1, 6, 12, "gelu", 2, 2), (64, 128))


# 6 text tokens + 4 visual tokens (T = 10), 16 patches of one image, 3 scored positions.
SAMPLE = SampleShape(text_tokens=6, images=1, image_width=8, image_height=8, frames=0, visual_tokens=4,
                     vision_patches=16)
LORA = Workload("lora", "BFloat16", lora_rank=2, lora_regex=rf"{LM}\.layers\.\d+\.(self_attn\.q_proj|mlp\.up_proj)")


def test_lora_counts_by_hand():
    c = count_flops(_profile(), LORA, SAMPLE, checkpoint_every=0, scored_tokens=3)
    # decoder matmuls 64 + 128 = 192 params over 10 tokens; the head (256) at the 3 scored positions only
    assert c.base_forward == 2 * 192 * 10 + 2 * 256 * 3 == 5376
    assert c.base_backward == c.base_forward  # frozen: input gradients only
    # causal full attention 2·T²·heads·head_dim; Gated DeltaNet 6·T·value_heads·key_dim·value_dim
    assert c.attention_forward == 2 * 10 * 10 * 2 * 4 + 6 * 10 * 2 * 4 * 4 == 3520
    assert c.attention_backward == 2 * 3520
    # r·(in + out) = 2·16 + 2·24 = 80 per token: forward, input gradient, weight gradient
    assert c.adapters == 3 * 2 * 80 * 10 == 4800
    # vision: 108 matmul params x 16 patches, attention 4·P²·hidden per block, projector 192 x 4 visual tokens
    assert c.vision_forward == 2 * 108 * 16 + 4 * 16 * 16 * 6 + 2 * 192 * 4 == 11136
    assert c.vision_backward == 0 and c.recompute == 0
    assert c.model == c.hardware == 5376 * 2 + 3520 * 3 + 4800 + 11136 == 37248
    assert c.six_nt == 6 * (64 + 128 + 256 + 256) * 10  # the common figure: every language parameter, every token


def test_recompute_is_hfu_only_and_follows_every_k():
    every_layer = count_flops(_profile(), LORA, SAMPLE, checkpoint_every=1, scored_tokens=3)
    decoder_forward = 2 * 192 * 10 + 3520 + 2 * 80 * 10  # no head, no vision
    assert every_layer.recompute == decoder_forward and every_layer.model == 37248
    assert every_layer.hardware == 37248 + decoder_forward
    assert count_flops(_profile(), LORA, SAMPLE, checkpoint_every=2).recompute == pytest.approx(decoder_forward / 2)
    # the planner's step estimate counts the same hardware FLOPs (the head on every position: no labels known)
    assert flops_per_sample(_profile(), LORA, SAMPLE, True, 2) == count_flops(_profile(), LORA, SAMPLE, 2).hardware
    assert flops_per_sample(_profile(), LORA, SAMPLE, False, 2) == count_flops(_profile(), LORA, SAMPLE, 0).hardware


def test_full_fine_tuning_trains_weights_and_projector():
    c = count_flops(_profile(), Workload("full", "BFloat16"), SAMPLE, scored_tokens=3)
    assert c.base_backward == 2 * c.base_forward and c.adapters == 0
    assert c.vision_backward == 2 * 192 * 4  # the projector's weight gradient; the frozen tower needs none
