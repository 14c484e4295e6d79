"""Training throughput on GPUs: tokens/s, MFU and peak memory per engine, without Ray.

Real-shaped Qwen3-VL-8B and Qwen3.5-9B with random weights (built from vray's shipped configs; no download), LoRA
and full fine-tuning, samples of 4096 tokens with one 896x896 image; each engine runs as a plain torch.distributed
group over this machine's GPUs (vray.train.local). MFU = model FLOPs per second (the planner's FLOPs per sample)
over the GPUs' dense bf16 peak. Target: MFU >= 40% on an H100; record what you measure.

    python benchmarks/train_throughput.py [--models qwen3vl:8B qwen3.5:9B] [--modes lora full]
                                          [--engines ddp fsdp2 zero3] [--steps 6]
    python benchmarks/train_throughput.py --tiny --steps 2     # a CPU dry run of the code path
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch
from PIL import Image
from results_io import write_result

SEQUENCE = 4096
IMAGE = 896


def dataset(folder: Path, processor_family: str, arch_key: str, count: int) -> str:
    """`count` samples of about SEQUENCE tokens: one IMAGE x IMAGE picture and a long question."""
    from vray.archs import registry
    from vray.data.collate import Collator
    from vray.data.sample import Sample
    from vray.models.loader import load_processor
    from vray.models.tiny import tiny_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (IMAGE, IMAGE), (90, 140, 200)).save(folder / "image.png")
    processor = load_processor(tiny_checkpoint(processor_family))
    ip = processor.image_processor
    if hasattr(ip, "merge_size"):
        factor = ip.patch_size * ip.merge_size
        ip.size = {"shortest_edge": 4 * factor * factor, "longest_edge": 16384 * factor * factor}
    collator = Collator(processor, registry.get(*arch_key.split(":")), None)

    def row(words: int) -> dict:
        return {"id": "s", "task": "vqa", "images": [str(folder / "image.png")], "conversation": [
            {"role": "user", "text": " ".join(["colour"] * words)}, {"role": "assistant", "text": "blue"}]}

    words = 64
    length = collator.encode(Sample.model_validate(row(words))).length
    words = max(1, words + (SEQUENCE - length))  # one token a word in this tokenizer
    with open(folder / "data.jsonl", "w") as fh:
        for i in range(count):
            fh.write(json.dumps({**row(words), "id": str(i)}) + "\n")
    return str(folder / "data.jsonl")


def measure(arch_key: str, mode: str, engine: str, steps: int, tiny: bool, workdir: Path) -> dict:
    from vray.archs import registry
    from vray.cluster import local_gpu
    from vray.plan.gpus import CATALOG
    from vray.plan.planner import flops_per_sample, sample_of, workload_of
    from vray.plan.profile import arch_profile
    from vray.spec import validate_spec
    from vray.storage.rundir import RunDir
    from vray.testing.real_shaped import write_real_shaped_checkpoint
    from vray.train.launcher import train_processes
    from vray.train.prepare import prepare

    name, size = arch_key.split(":")
    arch = registry.get(name, size)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    world = max(1, gpus)
    model_dir = workdir / "models" / arch_key.replace(":", "-")
    source = f"tiny:{arch.model_type}" if tiny else str(model_dir)
    if not tiny and not model_dir.exists():
        write_real_shaped_checkpoint(arch, model_dir)
    data = dataset(workdir / f"data-{arch.model_type}", arch.model_type, arch_key, steps * world)
    spec = validate_spec({
        "architecture": {"name": name, "size": size}, "model": {"source": source},
        "trainingMode": {"type": "Full" if mode == "full" else "LoRA"}, "compute": {"precisionType": "BFloat16"},
        "task": "vqa", "data": {"train": data, "maxTokens": SEQUENCE + 256},
        "hyperparameters": {"epochs": 1, "learningRate": 1e-5, "batchSize": world}, "lora": {"dropout": 0.0},
        "checkpointing": {"everySteps": 10**6}, "cluster": {"workers": world, "strategy": engine},
        "output": str(workdir / "runs"), "name": f"{arch_key.replace(':', '-')}-{mode}-{engine}",
    })
    record: dict = {"architecture": arch_key, "mode": mode, "engine": engine, "gpus": gpus}
    try:
        prepared = prepare(spec)  # on GPUs: the planner's micro-batch and checkpointing, with the engine forced
        run = train_processes(prepared)
    except Exception as exc:  # noqa: BLE001 - an engine that does not fit is a measurement, not a crash
        record["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        record["trace"] = traceback.format_exc()[-1500:]
        return record
    steps_rec = [r for r in RunDir.of(run.uri).read_metrics() if "loss" in r]
    steady = steps_rec[1:] or steps_rec
    span = steady[-1]["time"] - (steps_rec[0]["time"] if len(steps_rec) > 1 else steady[0]["time"] - 1)
    samples_per_s = len(steady) * world / max(span, 1e-9)
    profile = arch_profile(arch)
    flops = flops_per_sample(profile, workload_of(spec), sample_of(spec, profile), prepared.plan.gradient_checkpointing)
    found = local_gpu()
    peak_tflops = found[0].tflops if found else CATALOG["H100-80GB"].tflops
    record.update(samples_per_s=round(samples_per_s, 3), tokens_per_s=round(samples_per_s * SEQUENCE, 1),
                  mfu=None if tiny else round(samples_per_s * flops / (world * peak_tflops * 1e12), 4),
                  peak_gpu_bytes=max((r.get("gpu_peak_bytes", 0) for r in steps_rec), default=None),
                  gradient_checkpointing=prepared.plan.gradient_checkpointing, micro_batch=prepared.plan.micro_batch)
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["qwen3vl:8B", "qwen3.5:9B"])
    parser.add_argument("--modes", nargs="+", default=["lora", "full"])
    parser.add_argument("--engines", nargs="+", default=["ddp", "zero2", "zero3", "fsdp2"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--tiny", action="store_true", help="tiny checkpoints on the CPU (checks the code path)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models:
            for mode in args.modes:
                for engine in args.engines:
                    rec = measure(key, mode, engine, args.steps, args.tiny, Path(tmp))
                    print(json.dumps({k: v for k, v in rec.items() if k != "trace"}), flush=True)
                    records.append(rec)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu-dry-run"
    result = {"benchmark": "train_throughput", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": device, "sequence": SEQUENCE, "image": f"{IMAGE}x{IMAGE}", "tiny": args.tiny,
              "target": "MFU >= 0.40 on an H100", "records": records}
    write_result(args.out, "train_throughput", result, tag=device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
