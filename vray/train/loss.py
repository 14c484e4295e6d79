"""The training objective: the mean over every answer token of an optimizer step, whatever its split.

A step's micro-batches, on every rank, are one effective batch. Each micro-batch backpropagates the *sum* of its
answer tokens' cross-entropy divided by the answer tokens of the whole step (counted over all micro-batches and
all ranks before the first backward), so the gradient is that of the token mean over the effective batch: a
sample with ten boxes weighs ten times a sample with one, however the samples fall into micro-batches and ranks.
The engines undo their own averaging over ranks and accumulation (`Engine.backward`).

The training step computes this sum without building the full logits (`vray.train.label_loss`); `token_loss_sum`
here is the full-logit reference it equals, and the fallback for a head that is not a plain Linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vray.data.collate import IGNORE_INDEX


def answer_tokens(labels: torch.Tensor) -> int:
    """How many tokens of a batch are scored: every label after the first position that is not ignored."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the next-token predictions at the answer positions (shifted labels, -100 ignored),
    in fp32; only the scored positions' logits are upcast."""
    targets = labels[:, 1:].to(logits.device)
    scored = targets != IGNORE_INDEX
    picked = logits[:, :-1][scored]
    return F.cross_entropy(picked.float(), targets[scored], reduction="sum")
