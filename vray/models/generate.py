"""Generation with a run's evaluation settings, shared by evaluation during training and by serving."""

from __future__ import annotations

from collections.abc import Callable
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


class _EachStep:
    """A stopping criterion that hands `on_step` the number of sequences that got a token this step (a sequence
    stops getting them after its end token) and stops every sequence when it returns True."""

    def __init__(self, on_step: Callable[[int], bool], end_tokens: set[int]):
        self.on_step, self.end = on_step, torch.tensor(sorted(t for t in end_tokens if t is not None))
        self.alive: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        if self.alive is None:
            self.alive = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            self.end = self.end.to(input_ids.device)
        grew = int(self.alive.sum())
        self.alive &= ~torch.isin(input_ids[:, -1], self.end)
        return torch.full_like(self.alive, bool(self.on_step(grew)))


def generate_texts(model: nn.Module, tokenizer: Any, batch: dict[str, torch.Tensor], settings: GenerationSettings,
                   streamer: Any = None, on_step: Callable[[int], bool] | None = None) -> tuple[list[str], list[int]]:
    """(decoded completions, completion token counts) for a left-padded batch; `streamer` sees tokens as they come.

    `on_step(n)` runs after every decoding step in the generating thread, with the number of sequences that got a
    token; returning True stops the generation there (a cancelled request)."""
    keep_4bit_layout(model)  # generation must never repack 4-bit weights for CPU inference (vray.models.quantized)
    inputs = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in batch.items() if k != "labels"}
    eos = set(_as_list(model.generation_config.eos_token_id)) | {tokenizer.pad_token_id}
    extra: dict[str, Any] = {"streamer": streamer} if streamer is not None else {}
    if on_step is not None:
        from transformers import StoppingCriteriaList

        extra["stopping_criteria"] = StoppingCriteriaList([_EachStep(on_step, eos)])
    out = model.generate(**inputs, **settings.generate_kwargs(), pad_token_id=tokenizer.pad_token_id, **extra)
    new = out[:, inputs["input_ids"].shape[1]:]
    texts, counts = [], []
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
