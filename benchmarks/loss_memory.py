"""The training step's memory with the full logits and with the label-only loss, on CPU.

Checkpoints with the real vocabularies (151,936 like Qwen2.5-VL and Qwen3-VL, 248,320 like Qwen3.5; read from the
registry's configs) and tiny hidden sizes, so that the logits dominate; one text sample of `--tokens` tokens whose
answer covers most of them, so the chunking, not the label mask, earns the saving. Each path (full: the logits at
every position, then `token_loss_sum`; label-only: `LossHead`) runs one forward and backward of LoRA training, as
`Recipe._train_step` does, in a fresh process of its own, so its anonymous-memory high-water (RssAnon) is its own.
Target: the label-only step's high-water <= 25% of the full-logit step's.

    python benchmarks/loss_memory.py [--tokens 4096] [--precision BFloat16] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from results_io import write_result

TARGET = 0.25
FAMILIES = ("qwen3_vl", "qwen3_5")  # vocabularies 151,936 and 248,320
ANSWER_SHARE = 0.6
FILLER = " a"  # one token of the tiny tokenizers: the question grows a token at a time


def real_vocab(family: str) -> int:
    from vray.archs import registry
    from vray.models.tiny import REFERENCE

    return int(registry.get(*REFERENCE[family]).config["text_config"]["vocab_size"])


def write_checkpoint(family: str, folder: Path) -> Path:
    from vray.models.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(family, folder, vocab_size=real_vocab(family))


def long_sample(collator: Any, tokens: int) -> Any:
    """A text-only sample of exactly `tokens` tokens (its answer about ANSWER_SHARE of them), encoded."""
    from vray.data.sample import Sample

    words = "red blue green circle square triangle".split()

    def encode(question_words: int, answer_words: int) -> Any:
        answer = " ".join(words[i % len(words)] for i in range(answer_words))
        sample = Sample.model_validate({"id": "long", "task": "vqa", "conversation": [
            {"role": "user", "text": "Describe the shapes." + FILLER * question_words},
            {"role": "assistant", "text": answer}]})
        return collator.encode(sample)

    per_word = encode(0, 200).length - encode(0, 100).length  # tokens per 100 answer words
    answer_words = int(ANSWER_SHARE * tokens * 100 / per_word)
    base = encode(0, answer_words)
    while base.length > tokens:
        answer_words -= 10
        base = encode(0, answer_words)
    encoded = encode(tokens - base.length, answer_words)
    for _ in range(64):  # the filler is one token per word; correct any merge at the seam
        if encoded.length == tokens:
            return encoded
        encoded = encode(tokens - base.length + (tokens - encoded.length), answer_words)
    raise RuntimeError(f"could not build a sample of exactly {tokens} tokens (got {encoded.length})")


def child(args: argparse.Namespace) -> None:
    """One path's step in this (fresh) process; prints its measurements as JSON."""
    import gc

    import torch

    from vray.archs import registry
    from vray.data.collate import Collator
    from vray.models.loader import load_processor, prepare_for_training
    from vray.models.tiny import REFERENCE
    from vray.spec import LoraBlock
    from vray.testing.memory import AnonSampler, rss_anon
    from vray.train.label_loss import LossHead
    from vray.train.loss import answer_tokens, token_loss_sum

    torch.manual_seed(0)
    arch = registry.get(*REFERENCE[args.family])
    model, autocast = prepare_for_training(Path(args.checkpoint), arch, "LoRA", args.precision, None,
                                           LoraBlock(dropout=0.0), torch.device("cpu"))
    model.train()
    collator = Collator(load_processor(Path(args.checkpoint)), arch, None)
    encoded = long_sample(collator, args.tokens)
    batch = collator.batch(collator.with_vision([encoded]))  # as the training step collates a text-only batch
    labels = batch.pop("labels")
    scored = answer_tokens(labels)
    loss_head = LossHead.install(model, torch.device("cpu")) if args.path == "label" else None
    gc.collect()
    before = rss_anon()
    started = time.perf_counter()
    with AnonSampler() as sampler:
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            if loss_head is not None:
                out, loss_sum = loss_head.run(model, batch, labels)
            else:
                out = model(**batch)
                loss_sum = token_loss_sum(out.logits, labels)
        (loss_sum / scored).backward()  # `out` stays alive through the backward, as in the training step
    seconds = time.perf_counter() - started
    print(json.dumps({"family": args.family, "path": args.path, "vocab_size": real_vocab(args.family),
                      "sequence_tokens": int(labels.shape[1]), "sample_tokens": encoded.length,
                      "scored_tokens": scored, "answer_share": round(scored / encoded.length, 4),
                      "loss": float(loss_sum.detach()) / scored, "before_step_bytes": before,
                      "step_peak_bytes": sampler.peak, "step_added_bytes": sampler.peak - before,
                      "step_seconds": round(seconds, 2),
                      "chunk_rows": loss_head.chunk_rows if loss_head is not None else None,
                      "loss_path": loss_head.path if loss_head is not None else "full"}))


def measure(family: str, path: str, checkpoint: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", "--family", family, "--path", path, "--checkpoint", str(checkpoint),
           "--tokens", str(args.tokens), "--precision", args.precision]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode != 0:
        raise RuntimeError(f"{family} {path} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--precision", default="BFloat16", choices=["BFloat16", "Float32"])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--family", help=argparse.SUPPRESS)
    parser.add_argument("--path", choices=["full", "label"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    import torch

    rows = []
    with tempfile.TemporaryDirectory(prefix="vray-loss-memory-") as tmp:
        for family in args.families:
            checkpoint = write_checkpoint(family, Path(tmp) / family)
            full = measure(family, "full", checkpoint, args)
            label = measure(family, "label", checkpoint, args)
            ratio = label["step_peak_bytes"] / full["step_peak_bytes"]
            rows.append({"family": family, "vocab_size": full["vocab_size"], "full": full, "label_only": label,
                         "peak_ratio": round(ratio, 4),
                         "added_ratio": round(label["step_added_bytes"] / max(1, full["step_added_bytes"]), 4),
                         "loss_difference": abs(label["loss"] - full["loss"]), "meets_target": ratio <= TARGET})
            print(f"{family} (vocab {full['vocab_size']}): full {full['step_peak_bytes'] / 2**30:.2f} GiB, "
                  f"label-only {label['step_peak_bytes'] / 2**30:.2f} GiB high-water ({ratio:.1%})")
    result = {"benchmark": "loss_memory", "time": datetime.now(timezone.utc).isoformat(),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
              "measure": "RssAnon high-water of one LoRA forward+backward, each path in a fresh process",
              "precision": args.precision, "tokens": args.tokens, "target_peak_ratio": TARGET,
              "rows": rows, "meets_target": all(r["meets_target"] for r in rows)}
    write_result(args.out, "loss_memory", result)


if __name__ == "__main__":
    main()
