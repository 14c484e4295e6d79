"""How many rows of logits the label-only loss builds at a time: one rule for the loss and the planner's term."""

from __future__ import annotations

LOSS_CHUNK_BYTES = 256 * 2**20  # fp32 logits of one chunk of scored positions
MIN_CHUNK_ROWS = 64


def loss_chunk_rows(vocab_size: int) -> int:
    """Scored positions per chunk: as many fp32 logit rows of `vocab_size` as fit in LOSS_CHUNK_BYTES."""
    return max(MIN_CHUNK_ROWS, LOSS_CHUNK_BYTES // (4 * max(1, vocab_size)))
