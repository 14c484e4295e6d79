"""What a model needs to train on packed rows: per-sample positions, and linear-attention state kept per sample.

A packed row holds several samples end to end with no attention mask (`Collator.pack`). Its `position_ids` restart
at 0 for every sample; transformers derives the sample boundaries from them:
- sdpa / eager (`masking_utils.find_packed_sequence_indices`): a block-diagonal causal mask;
- flash-attention (`modeling_flash_attention_utils.prepare_fa_kwargs_from_position_ids`): varlen `cu_seqlens`.
The mRoPE families (Qwen2.5-VL, Qwen3-VL, Qwen3.5) take `position_ids` of four rows, [text; t; h; w]: the text row
gives the boundaries, the mRoPE rows are each sample's own rope index (the model's `get_rope_index`).

Qwen3.5's Gated DeltaNet layers carry a recurrent state and a causal-conv1d window along the row. With
flash-linear-attention and causal-conv1d on a GPU they receive `cu_seqlens` / `seq_idx` and restart at every sample;
otherwise (their PyTorch fallbacks ignore both) each layer runs once per sample of the row, which gives the same
numbers. The vision towers are unaffected: they take their own `cu_seqlens` from `image_grid_thw`.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

Positions = Callable[[dict[str, torch.Tensor]], torch.Tensor]
_LINEAR_ATTENTION = ("Qwen3_5GatedDeltaNet", "Qwen3_5MoeGatedDeltaNet")
_TEXT_MODELS = ("Qwen3_5TextModel", "Qwen3_5MoeTextModel")
_VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def sample_positions(model: nn.Module) -> Positions:
    """One sample's positions for `Collator.pack`: [L] (0..L-1) for plain rotary families, [4, L] for the mRoPE
    families (text row 0..L-1, then the model's own rope index of the sample alone)."""
    rope = next((m for m in model.modules() if callable(getattr(m, "get_rope_index", None))), None)
    if rope is None:
        return _plain
    return functools.partial(_mrope, rope)


def _plain(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.arange(tensors["input_ids"].shape[0])


def _mrope(rope: nn.Module, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    ids = tensors["input_ids"][None]
    types = tensors.get("mm_token_type_ids")
    if types is None:  # a processor that does not return them: image tokens 1, video tokens 2
        config = rope.config
        types = torch.zeros_like(ids)
        types[ids == getattr(config, "image_token_id", -1)] = 1
        types[ids == getattr(config, "video_token_id", -1)] = 2
    else:
        types = types[None]
    kwargs = {k: tensors[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in tensors}
    with torch.no_grad():
        mrope, _ = rope.get_rope_index(ids, mm_token_type_ids=types, attention_mask=None, **kwargs)
    text = torch.arange(ids.shape[1], dtype=mrope.dtype)[None]
    return torch.cat([text, mrope[:, 0].to(text.device)], dim=0)


def prepare_for_packing(model: nn.Module) -> int:
    """Make the model's linear-attention layers (Qwen3.5 Gated DeltaNet) keep their state per packed sample. Their
    text model learns the row's sample boundaries from the text positions (a forward pre-hook passes them on as
    `cu_seq_lens_q` and friends, which flash-attention takes as they are), and each such layer either hands them to
    the kernels or runs once per sample. Returns how many layers it changed (0 for other families)."""
    changed = 0
    for module in model.modules():
        name = type(module).__name__
        if name in _TEXT_MODELS and not getattr(module, "_vray_packing", False):
            module.register_forward_pre_hook(_boundaries_from_positions, with_kwargs=True)
            module._vray_packing = True
        elif name in _LINEAR_ATTENTION and not getattr(module, "_vray_packing", False):
            module.forward = _per_sample(module.forward)
            module._vray_packing = True
            changed += 1
    return changed


def _boundaries_from_positions(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
    """Forward pre-hook of a Qwen3.5 text model: a packed row (four-row positions, no attention mask, batch 1) gets
    its samples' cumulative lengths from the text row, where every sample restarts at 0."""
    positions = kwargs.get("position_ids")
    if (positions is None or kwargs.get("attention_mask") is not None or positions.ndim != 3
            or positions.shape[0] != 4 or positions.shape[1] != 1):
        return args, kwargs
    text = positions[0, 0]
    starts = (text == 0).nonzero().view(-1).to(torch.int32)
    if starts.numel() < 2:
        return args, kwargs
    cu = torch.cat([starts, torch.tensor([text.numel()], dtype=torch.int32, device=text.device)])
    longest = int((cu[1:] - cu[:-1]).max())
    seq_idx = torch.repeat_interleave(torch.arange(cu.numel() - 1, dtype=torch.int32, device=text.device),
                                      (cu[1:] - cu[:-1]).long())[None]
    kwargs = {**kwargs, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest,
              "seq_idx": seq_idx}
    return args, kwargs


@functools.cache
def linear_attention_kernels() -> bool:
    """Whether flash-linear-attention and causal-conv1d are importable (transformers then uses them, and they honour
    `cu_seqlens` and `seq_idx`)."""
    try:
        importlib.import_module("fla")
        importlib.import_module("causal_conv1d")
    except Exception:  # noqa: BLE001 - missing, or built for another torch / CUDA
        return False
    return True


def _per_sample(forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A Gated DeltaNet forward that never carries state from one packed sample to the next."""

    @functools.wraps(forward)
    def run(hidden_states: torch.Tensor, cache: Any = None, attention_mask: Any = None, **kwargs: Any) -> torch.Tensor:
        cu = kwargs.get("cu_seq_lens_q")
        if cu is None or cache is not None:
            return forward(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
        if hidden_states.is_cuda and linear_attention_kernels():
            return forward(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
        rest = {k: v for k, v in kwargs.items() if k not in _VARLEN_KEYS}
        bounds = cu.tolist()
        pieces = [forward(hidden_states[:, a:b], cache=None, attention_mask=None, **rest)
                  for a, b in zip(bounds[:-1], bounds[1:])]
        return torch.cat(pieces, dim=1)

    return run
