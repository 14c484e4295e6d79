"""Padding-free packing against padded micro-batches, on a realistic length mix: the padding share, and tokens/s.

The length mix (seeded) is built from samples encoded by the tiny Qwen2.5-VL checkpoint's real processor (its
14-pixel patches and 2x2 merge: a COCO-sized image at media.maxPixels 448x448 is about 250 visual tokens; its text
tokenizer is a small byte-level BPE, so text runs longer in tokens than with the real one):
- half LLaMA-Factory-style multi-turn chat (ShareGPT layout): 1 to 4 rounds, user turns of a log-normal number of
  words (median 18), assistant turns of a log-normal number (median 45, capped at 300); 30% of them open with one
  image;
- half COCO-style grounding: one image of a COCO size (640x480, 480x640, 640x427 or 500x375), "find every <label>"
  and 1 to 12 boxes as the answer (geometric, mean about 3 a category, as COCO's instances per category per image).

(a) The padding share: samples in seeded order, steps of `--step-samples` samples; padded: micro-batches of
`--micro` samples right-padded to their longest; packed: rows of at most `--pack-tokens` tokens. The share is the
pad tokens over all tokens computed; for packing the unused room of each row is reported beside it (nothing is
computed for it: rows are only as long as their samples).
(b) Tokens/s of LoRA fp32 training steps (forward, backward, AdamW) of the tiny model on this CPU, packed vs
padded, over the same samples in the same run, step by step in turn (real tokens, not pad, per second). Target:
packed >= 1.3x padded.

    python benchmarks/packing.py [--samples 240] [--steps 4] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from PIL import Image
from results_io import write_result

TARGET = 1.3
FAMILY, ARCH = "qwen2_5_vl", ("qwen2.5vl", "3B")
COCO_SIZES = [(640, 480), (480, 640), (640, 427), (500, 375)]
LABELS = ["person", "car", "dog", "cup", "chair", "bottle", "bicycle", "bird", "traffic light", "umbrella"]
WORDS = ("the of and to in is that for it with as was on be at by this had not are but from or have an they which one "
         "you were her all she there would their we him been has when who will more no if out so said what up its "
         "about into than them can only other new some could time these two may then do first any my now such like "
         "our over man me even most made after also did many before must through back years where much your way"
         ).split()


def _text(rng: random.Random, median: float, sigma: float, cap: int) -> str:
    n = max(1, min(cap, int(rng.lognormvariate(math.log(median), sigma))))
    return " ".join(rng.choice(WORDS) for _ in range(n))


def length_mix(n: int, seed: int, folder: Path) -> tuple[list, list[list[Image.Image]]]:
    """`n` samples (half chat, half grounding) and their images, in a seeded order."""
    from vray.data.sample import Sample

    rng = random.Random(seed)
    samples, images = [], []
    for i in range(n):
        if i % 2 == 0:  # multi-turn chat
            with_image = rng.random() < 0.3
            conversation = []
            for r in range(rng.randint(1, 4)):
                question = _text(rng, 18, 0.9, 200)
                conversation += [{"role": "user", "text": ("<image>" if with_image and r == 0 else "") + question},
                                 {"role": "assistant", "text": _text(rng, 45, 1.0, 300)}]
            size = rng.choice(COCO_SIZES)
            imgs = [Image.new("RGB", size, (rng.randrange(256), 90, 160))] if with_image else []
        else:  # COCO-style grounding
            w, h = rng.choice(COCO_SIZES)
            label = rng.choice(LABELS)
            count = min(12, 1 + int(math.log(1 - rng.random()) / math.log(1 - 1 / 3)))
            boxes = []
            for _ in range(count):
                x0, y0 = rng.uniform(0, w - 40), rng.uniform(0, h - 40)
                boxes.append({"label": label, "bbox": [x0, y0, min(w, x0 + rng.uniform(20, w / 2)),
                                                       min(h, y0 + rng.uniform(20, h / 2))]})
            conversation = [{"role": "user", "text": f"<image>Find every {label} in the image."},
                            {"role": "assistant", "text": "", "boxes": boxes}]
            imgs = [Image.new("RGB", (w, h), (30, rng.randrange(256), 200))]
        samples.append(Sample.model_validate({"id": f"s{i}", "task": "vqa" if i % 2 == 0 else "phrase_grounding",
                                              "images": [f"{folder}/s{i}-{k}.png" for k in range(len(imgs))],
                                              "conversation": conversation}))
        images.append(imgs)
    order = list(range(n))
    rng.shuffle(order)
    return [samples[i] for i in order], [images[i] for i in order]


def padding_share(lengths: list[int], step: int, micro: int, pack_tokens: int, visual: list[bool],
                  dummy: int) -> dict:
    """Pad tokens over computed tokens, padded and packed, stepping through the samples as training does."""
    from vray.data.collate import pack_in_order

    real = padded_cells = rows = row_room = 0
    padded_mbs = 0
    for s in range(0, len(lengths) - step + 1, step):
        chunk = lengths[s:s + step]
        real += sum(chunk)
        for m in range(0, step, micro):
            mb = chunk[m:m + micro]
            padded_cells += len(mb) * max(mb)
            padded_mbs += 1
        groups = pack_in_order(chunk, pack_tokens, visual[s:s + step], dummy)
        rows += len(groups)
        row_room += sum(pack_tokens - sum(chunk[i] for i in g) for g in groups)
    return {"real_tokens": real, "padded": {"computed_tokens": padded_cells, "micro_batches": padded_mbs,
                                            "padding_share": 1 - real / padded_cells},
            "packed": {"computed_tokens": real, "rows": rows, "padding_share": 0.0,
                       "unused_row_share": row_room / (rows * pack_tokens)}}


def tokens_per_second(encoded: list, collator, step: int, micro: int, pack_tokens: int, steps: int,
                      repeats: int) -> dict:
    """Real tokens per second of LoRA fp32 training steps (forward, backward, AdamW), padded and packed, over `steps`
    steps of `step` samples after one warm-up step each. The two run step by step in turn (two models from the same
    seed), each step `repeats` times and the fastest kept, so a shared machine whose load changes slows neither
    more than the other."""
    from vray.archs import registry
    from vray.data.collate import pack_in_order
    from vray.models.loader import prepare_for_training
    from vray.models.packing import prepare_for_packing, sample_positions
    from vray.models.tiny import tiny_checkpoint
    from vray.spec import LoraBlock
    from vray.train.loss import token_loss_sum

    runs = {}
    for mode in ("padded", "packed"):
        torch.manual_seed(0)
        model, _ = prepare_for_training(tiny_checkpoint(FAMILY), registry.get(*ARCH), "LoRA", "Float32", None,
                                        LoraBlock(dropout=0.0), torch.device("cpu"))
        model.train()
        positions = None
        if mode == "packed":
            prepare_for_packing(model)
            positions = sample_positions(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        runs[mode] = (model, optimizer, positions, [], [])

    def batches(mode: str, chunk: list) -> list[dict]:
        if mode == "padded":
            return [collator.batch(collator.with_vision(chunk[m:m + micro])) for m in range(0, len(chunk), micro)]
        groups = pack_in_order([e.length for e in chunk], pack_tokens, [e.has_visual for e in chunk],
                               collator.vision_dummy().length)
        return [collator.pack(collator.with_vision([chunk[i] for i in g]), runs[mode][2]) for g in groups]

    for s in range(steps + 1):
        chunk = encoded[s * step:(s + 1) * step]
        best: dict[str, float] = {}
        for _ in range(repeats):  # each step `repeats` times per mode, in turn; the fastest counts
            for mode, (model, optimizer, _, _, _) in runs.items():
                prepared = batches(mode, chunk)
                t0 = time.perf_counter()
                for batch in prepared:
                    labels = batch.pop("labels")
                    token_loss_sum(model(**batch, use_cache=False).logits, labels).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                best[mode] = min(best.get(mode, math.inf), time.perf_counter() - t0)
        if s:  # the first step warms up
            for mode, (_, _, _, times, tokens) in runs.items():
                times.append(best[mode])
                tokens.append(sum(e.length for e in chunk))
    out = {}
    for mode, (_, _, _, times, tokens) in runs.items():
        out[mode] = {"steps": steps, "micro_batches_per_step": len(batches(mode, encoded[:step])),
                     "seconds": sum(times), "tokens": sum(tokens), "tokens_per_s": sum(tokens) / sum(times),
                     "step_seconds": times}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=240, help="samples in the length mix")
    parser.add_argument("--step-samples", type=int, default=16, help="samples of one optimizer step on one rank")
    parser.add_argument("--micro", type=int, default=4, help="samples of one padded micro-batch")
    parser.add_argument("--pack-tokens", type=int, default=4096, help="tokens of one packed row")
    parser.add_argument("--steps", type=int, default=6, help="timed training steps per mode")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each timed step per mode (the fastest counts)")
    parser.add_argument("--max-pixels", type=int, default=448 * 448)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    from vray.archs import registry
    from vray.data.collate import Collator
    from vray.models.loader import load_processor
    from vray.models.tiny import tiny_checkpoint
    from vray.spec import MediaBlock

    arch = registry.get(*ARCH)
    processor = load_processor(tiny_checkpoint(FAMILY), MediaBlock(maxPixels=args.max_pixels), arch=arch)
    collator = Collator(processor, arch, "You are a helpful assistant.")
    with tempfile.TemporaryDirectory() as tmp:
        samples, images = length_mix(args.samples, args.seed, Path(tmp))
        t0 = time.perf_counter()
        encoded = [collator.encode(s, images=im) for s, im in zip(samples, images)]
        encode_s = time.perf_counter() - t0
    lengths = [e.length for e in encoded]
    too_long = [e.sample_id for e in encoded if e.length > args.pack_tokens]
    if too_long:
        print(f"{len(too_long)} samples are longer than --pack-tokens {args.pack_tokens}", file=sys.stderr)
        return 2
    dummy = collator.vision_dummy().length
    share = padding_share(lengths, args.step_samples, args.micro, args.pack_tokens, [e.has_visual for e in encoded],
                          dummy)
    timed = encoded[:args.step_samples * (args.steps + 1)]
    timed_share = padding_share([e.length for e in timed], args.step_samples, args.micro, args.pack_tokens,
                                [e.has_visual for e in timed], dummy)
    timed_runs = tokens_per_second(encoded, collator, args.step_samples, args.micro, args.pack_tokens, args.steps,
                                   args.repeats)
    padded, packed = timed_runs["padded"], timed_runs["packed"]
    speedup = packed["tokens_per_s"] / padded["tokens_per_s"]
    # The same samples step by step: the median of the per-step ratios is the least sensitive to the machine's load.
    paired = statistics.median(a / b for a, b in zip(padded["step_seconds"], packed["step_seconds"]))
    result = {
        "benchmark": "packing", "time": datetime.now(timezone.utc).isoformat(), "host": platform.node(),
        "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "model": f"tiny:{FAMILY}",
        "settings": {k: getattr(args, k) for k in ("samples", "step_samples", "micro", "pack_tokens", "steps",
                                                    "repeats", "max_pixels", "seed")},
        "length_mix": {"samples": len(lengths), "mean": statistics.mean(lengths), "median": statistics.median(lengths),
                       "p90": sorted(lengths)[int(0.9 * len(lengths))], "max": max(lengths), "min": min(lengths),
                       "chat_mean": statistics.mean(lengths[i] for i, s in enumerate(samples) if s.task == "vqa"),
                       "grounding_mean": statistics.mean(lengths[i] for i, s in enumerate(samples)
                                                         if s.task != "vqa"),
                       "encode_seconds": encode_s},
        "padding_share": share,
        "throughput": {"samples_timed": len(timed) - args.step_samples, "padding_share_of_timed": timed_share,
                       "padded": padded, "packed": packed, "speedup": speedup,
                       "speedup_median_step": paired, "target": TARGET, "meets_target": speedup >= TARGET},
    }
    write_result(args.out, "packing", result, echo=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
