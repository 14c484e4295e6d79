"""Padding-free packing: a packed row trains exactly like the padded micro-batch of the same samples.

Per family (fp32, tiny checkpoints, LoRA; NVILA-Lite, which has no LoRA targets, Full): the summed answer-token
loss and the gradients of every trainable parameter of one packed row (per-sample positions, no attention mask) equal those of the right-padded batch, for
samples of different lengths with images in some and one text-only. Attention, mRoPE positions and Qwen3.5's Gated
DeltaNet state must all stay inside each sample for that to hold.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vray.archs import registry
from vray.data.collate import Collator, pack_in_order
from vray.data.sample import Sample
from vray.errors import DataError
from vray.models import packing
from vray.models.loader import load_processor, prepare_for_training
from vray.models.packing import prepare_for_packing, sample_positions
from vray.models.tiny import REFERENCE, tiny_checkpoint
from vray.spec import LoraBlock
from vray.train.loss import token_loss_sum

FAMILIES = ["qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "internvl", "nvila_lite"]


def _samples() -> tuple[list[Sample], list[list[Image.Image]]]:
    rows = [
        ("a", "<image>What colour is the square?", "green, and a little blue on the left side", [(96, 64)]),
        ("b", "Say something about the weather today, please.", "sunny", []),
        ("c", "<image>Count the shapes in the picture.", "three", [(64, 128)]),
        ("d", "<image><image>Which picture is brighter, and why do you think so?",
         "the second one, its background is white", [(56, 56), (80, 80)]),
    ]
    samples, images = [], []
    for i, (sid, question, answer, sizes) in enumerate(rows):
        samples.append(Sample.model_validate({
            "id": sid, "task": "vqa", "images": [f"{sid}{k}.png" for k in range(len(sizes))],
            "conversation": [{"role": "user", "text": question}, {"role": "assistant", "text": answer}]}))
        images.append([Image.new("RGB", size, (40 * i, 200 - 30 * i, 90 + k * 60)) for k, size in enumerate(sizes)])
    return samples, images


def _loss_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    batch = dict(batch)
    labels = batch.pop("labels")
    model.zero_grad(set_to_none=True)
    loss = token_loss_sum(model(**batch, use_cache=False).logits, labels)
    loss.backward()
    return float(loss.detach()), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_loss_and_gradients_equal_the_padded_ones(family):
    torch.manual_seed(0)
    path = tiny_checkpoint(family)
    arch = registry.get(*REFERENCE[family])
    collator = Collator(load_processor(path), arch, "Sys.")
    samples, images = _samples()
    encoded = [collator.encode(s, images=im) for s, im in zip(samples, images)]
    assert len({e.length for e in encoded}) >= 3
    mode = "Full" if family == "nvila_lite" else "LoRA"  # NVILA-Lite: full fine-tuning only (no LoRA targets)
    model, _ = prepare_for_training(path, arch, mode, "Float32", None, LoraBlock(rank=4, dropout=0.0),
                                    torch.device("cpu"))
    model.train()
    padded_loss, padded = _loss_and_grads(model, collator.batch(encoded))

    positions = sample_positions(model)
    packed_batch = collator.pack(encoded, positions)
    if family.startswith("qwen3_5"):  # without per-sample Gated DeltaNet state, the state leaks: the check can fail
        leaked, _ = _loss_and_grads(model, packed_batch)
        assert abs(leaked - padded_loss) > 1e-3
    changed = prepare_for_packing(model)
    assert (changed > 0) == family.startswith("qwen3_5")
    total = sum(e.length for e in encoded)
    assert packed_batch["input_ids"].shape == (1, total) and "attention_mask" not in packed_batch
    mrope = family not in ("internvl", "nvila_lite")
    assert packed_batch["position_ids"].shape == ((4, 1, total) if mrope else (1, total))
    text_row = packed_batch["position_ids"].reshape(-1, total)[0]
    assert int((text_row == 0).sum()) == len(encoded)  # every sample restarts at 0
    # The language model's attention runs one sdpa call per packed sample; the vision tower keeps sdpa.
    impls = {type(m).__name__: m.config._attn_implementation for m in model.modules()
             if hasattr(m, "is_causal") and getattr(m, "config", None) is not None}
    assert packing.PACKED_SDPA in impls.values() and set(impls.values()) <= {packing.PACKED_SDPA, "sdpa"}
    packed_loss, packed = _loss_and_grads(model, packed_batch)
    assert [b - a for a, b in packing._last_bounds[1]] == [e.length for e in encoded]
    again, _ = _loss_and_grads(model, collator.batch(encoded))  # padded batches still run sdpa as it is
    assert abs(again - padded_loss) <= 1e-6 * max(1.0, abs(padded_loss))

    assert abs(packed_loss - padded_loss) <= 1e-4 * max(1.0, abs(padded_loss)), (packed_loss, padded_loss)
    assert packed.keys() == padded.keys() and packed
    worst = max(float((packed[n] - padded[n]).abs().max()) for n in padded)
    scale = max(float(g.abs().max()) for g in padded.values())
    assert worst <= 1e-4 * max(1.0, scale), (worst, scale)

    # Positions that run on across the samples (one long sequence) let attention cross them: the check can fail.
    leaky = dict(packed_batch)
    leaky["position_ids"] = torch.arange(total).expand_as(packed_batch["position_ids"]) if not mrope else \
        torch.cat([torch.arange(total).view(1, 1, -1), packed_batch["position_ids"][1:]])
    leaky_loss, _ = _loss_and_grads(model, leaky)
    assert abs(leaky_loss - padded_loss) > 1e-3


def test_packing_keeps_the_order_and_the_budget():
    lengths = [5, 4, 3, 9, 1, 2, 10]
    visual = [True, False, False, True, False, False, False]
    groups = pack_in_order(lengths, 10, visual)
    assert [i for g in groups for i in g] == list(range(len(lengths)))  # every sample once, in order
    assert all(sum(lengths[i] for i in g) <= 10 for g in groups)
    assert groups == [[0, 1], [2], [3, 4], [5], [6]]  # greedy: a sample that does not fit opens the next row
    # A text-only row is charged the vision dummy's tokens; a lone sample always fits.
    assert pack_in_order([3, 3], 8, [False, False], extra=2) == [[0, 1]]
    assert pack_in_order([3, 4], 8, [False, False], extra=2) == [[0], [1]]
    assert pack_in_order([3, 4], 8, [True, False], extra=2) == [[0, 1]]
    with pytest.raises(DataError, match="sample 'long' is 11 tokens"):
        pack_in_order([4, 11], 10, [False, False], names=["short", "long"])
    # A budget the planner derived from (possibly estimated) counts: a longer sample gets a row of its own.
    assert pack_in_order([4, 11, 2], 10, [False, False, False], strict=False) == [[0], [1], [2]]
