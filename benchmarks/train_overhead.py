"""vray's training loop against a plain single-process PyTorch loop doing the same forward, backward and step.

One CPU worker, the tiny Qwen2.5-VL checkpoint with LoRA, the synthetic VQA set; the plain loop encodes each batch
with the same collator and steps the same AdamW. Target: vray's step time <= 1.10 x the plain loop's.

    python benchmarks/train_overhead.py [--steps 60] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from results_io import write_result

TARGET = 1.10


def spec_dict(output: str, steps: int) -> dict:
    return {"architecture": {"name": "qwen2.5vl", "size": "3B"}, "model": {"source": "tiny:qwen2_5_vl"},
            "compute": {"precisionType": "Float32"}, "task": "vqa", "data": {"train": f"synthetic:vqa?train={steps * 8}&eval=1"},
            "hyperparameters": {"epochs": 1, "learningRate": 3e-3, "batchSize": 8}, "lora": {"dropout": 0.0},
            "evaluation": {"maxNewTokens": 2, "temperature": 0}, "checkpointing": {"everySteps": 10**6},
            "cluster": {"workers": 1}, "output": output, "name": "overhead"}


def vray_step_seconds(output: str, steps: int, skip: int) -> float:
    from vray.spec import validate_spec
    from vray.train.launcher import train_local
    from vray.train.prepare import prepare

    run = train_local(prepare(validate_spec(spec_dict(output, steps))))
    times = [r["time"] for r in run.read_metrics() if "loss" in r]
    return (times[-1] - times[skip]) / (len(times) - 1 - skip)


def plain_step_seconds(steps: int, skip: int) -> float:
    from vray.archs import registry
    from vray.data import synthetic
    from vray.data.collate import Collator
    from vray.data.io import read_samples
    from vray.models.loader import load_processor, prepare_for_training
    from vray.models.tiny import tiny_checkpoint
    from vray.spec import LoraBlock

    torch.manual_seed(0)
    arch = registry.get("qwen2.5vl", "3B")
    folder = tiny_checkpoint("qwen2_5_vl")
    model, _ = prepare_for_training(folder, arch, "LoRA", "Float32", None, LoraBlock(dropout=0.0), torch.device("cpu"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    collator = Collator(load_processor(folder), arch, "You are a visual assistant.")
    samples = read_samples(str(synthetic.split_paths(f"synthetic:vqa?train={steps * 8}&eval=1")[0])).samples
    marks = []
    for step in range(steps):
        batch = collator.batch([collator.encode(s) for s in samples[step * 8:(step + 1) * 8]])
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append(time.time())
    return (marks[-1] - marks[skip]) / (len(marks) - 1 - skip)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    skip = 5  # warm-up steps left out of both
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("VRAY_CACHE", str(Path(tmp) / "cache"))
        plain = plain_step_seconds(args.steps, skip)
        vray = vray_step_seconds(str(Path(tmp) / "runs"), args.steps, skip)
    result = {"benchmark": "train_overhead", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": "cpu", "threads": 1},
              "steps": args.steps, "plain_step_s": round(plain, 4), "vray_step_s": round(vray, 4),
              "ratio": round(vray / plain, 3), "target_ratio": TARGET, "meets_target": vray / plain <= TARGET}
    write_result(args.out, "train_overhead", result, echo=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
