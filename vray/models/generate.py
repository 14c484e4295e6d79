"""Generation with a run's evaluation settings, shared by evaluation during training and by serving."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vray.models.quantized import keep_4bit_layout
from vray.spec import EvaluationBlock

_DEFAULTS = EvaluationBlock().for_task(None)


@dataclass(frozen=True)
class GenerationSettings:
    """max_new_tokens, temperature (0 = greedy), top_p, top_k (0 = off), repetition_penalty."""

    # The defaults are the spec's evaluation defaults when no task is known: one place says what an unset
    # setting means.
    max_new_tokens: int = _DEFAULTS.maxNewTokens
    temperature: float = _DEFAULTS.temperature
    top_p: float = _DEFAULTS.topP
    top_k: int = _DEFAULTS.topK
    repetition_penalty: float = _DEFAULTS.repetitionPenalty
    synced: bool = False  # sharded engines: ranks that finish keep stepping until every rank has (synced_gpus)

    @classmethod
    def from_evaluation(cls, evaluation: EvaluationBlock) -> GenerationSettings:
        """From a spec's `evaluation` block, with its task's defaults already applied (`EvaluationBlock.for_task`,
        which a resolved spec and a ServeTarget have done): nothing here decides what an unset value means."""
        if evaluation.temperature is None or evaluation.repetitionPenalty is None:
            raise ValueError("an evaluation block without its task's defaults; apply EvaluationBlock.for_task first")
        return cls(
            max_new_tokens=evaluation.maxNewTokens,
            temperature=evaluation.temperature,
            top_p=evaluation.topP,
            top_k=evaluation.topK,
            repetition_penalty=evaluation.repetitionPenalty,
        )

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for transformers' `generate`."""
        # Said either way: transformers turns synced_gpus on by itself for FSDP and ZeRO-3 models, which would make
        # every rank wait on the others even when the whole model is gathered for generation.
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty,
                                  "synced_gpus": self.synced}
        if self.temperature == 0:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or None)
        return kwargs


def generate_texts(model: nn.Module, tokenizer: Any, batch: dict[str, torch.Tensor],
                   settings: GenerationSettings, streamer: Any = None) -> tuple[list[str], list[int]]:
    """(decoded completions, completion token counts) for a left-padded batch; `streamer` sees tokens as they come."""
    keep_4bit_layout(model)  # generation must never repack 4-bit weights for CPU inference (vray.models.quantized)
    inputs = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in batch.items() if k != "labels"}
    extra = {"streamer": streamer} if streamer is not None else {}
    out = model.generate(**inputs, **settings.generate_kwargs(), pad_token_id=tokenizer.pad_token_id, **extra)
    new = out[:, inputs["input_ids"].shape[1]:]
    texts, counts = [], []
    eos = set(_as_list(model.generation_config.eos_token_id)) | {tokenizer.pad_token_id}
    for row in new.tolist():
        kept = []
        for tok in row:
            if tok in eos:
                break
            kept.append(tok)
        counts.append(len(kept) + (1 if len(kept) < len(row) else 0))
        texts.append(tokenizer.decode(kept, skip_special_tokens=False).strip())
    return texts, counts


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
