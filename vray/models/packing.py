"""What a model needs to train on packed rows: per-sample positions, and linear-attention state kept per sample.

A packed row holds several samples end to end with no attention mask (`Collator.pack`). Its `position_ids` restart
at 0 for every sample; transformers derives the sample boundaries from them:
- sdpa / eager (`masking_utils.find_packed_sequence_indices`): a block-diagonal causal mask;
- flash-attention (`modeling_flash_attention_utils.prepare_fa_kwargs_from_position_ids`): varlen `cu_seqlens`.
On sdpa the block-diagonal mask still spans the whole row, so attention costs the square of the row rather than
the sum of its samples' squares: a packed row's language model therefore runs `PACKED_SDPA`, which gives the same
numbers by calling sdpa once per sample (causal, no mask), and hands every other call (padded batches, generation,
non-causal attention) to sdpa as it is.
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
PACKED_SDPA = "vray_packed_sdpa"  # the attention of a packed row's language model where it would run sdpa


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
    _packed_sdpa_for_language_model(model)
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


def _packed_sdpa_for_language_model(model: nn.Module) -> None:
    """Switch the causal (language-model) attention from sdpa to PACKED_SDPA; the vision tower keeps its own."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)  # masks as sdpa builds them, for the calls it hands on
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(module, "is_causal", False) is True and getattr(config, "_attn_implementation", None) == "sdpa":
            config._attn_implementation = PACKED_SDPA


def packed_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """sdpa over a packed row one sample at a time (each causal on its own: the same numbers as the row's
    block-diagonal mask, at the cost of its samples' squares); any other call is sdpa's."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = _row_samples(kwargs.get("position_ids"), query, key)
    if bounds is None or kwargs.get("is_causal") is False or not getattr(module, "is_causal", False):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rest = {k: v for k, v in kwargs.items() if k != "is_causal"}
    pieces = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None,
                                     is_causal=True, **rest)[0] for a, b in bounds]
    return torch.cat(pieces, dim=1), None


_last_bounds: list[Any] = [None, None]  # (the positions tensor, its samples): every layer of a forward shares them


def _row_samples(positions: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> list[tuple[int, int]] | None:
    """[start, end) of each sample of a packed row (one row whose positions restart at 0 more than once, queries
    and keys over the same tokens); None for anything else."""
    if positions is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return None
    if positions.shape[-1] != query.shape[2]:
        return None
    if _last_bounds[0] is not positions:
        text = positions.reshape(-1, positions.shape[-1])[0]
        starts = (text == 0).nonzero().view(-1).tolist()
        ends = starts[1:] + [text.numel()]
        _last_bounds[:] = [positions, list(zip(starts, ends)) if len(starts) > 1 and starts[0] == 0 else None]
    return _last_bounds[1]
