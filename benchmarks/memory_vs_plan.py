"""Predicted vs measured peak GPU memory: real-shaped models with random weights, trained at the planned settings.

For each checkpoint x mode it builds the model from vray's shipped config (random weights, no download),
saves it and loads it back through vray's loader (bf16 base + fp32 adapters, 4-bit NF4 under QLoRA, fp32
master weights under full fine-tuning), asks the planner for the plan on this GPU, runs a few optimizer
steps on a synthetic sample of the planned shape at the planned micro-batch and gradient checkpointing, and
records `torch.cuda.max_memory_allocated()` against the plan's per-GPU total. No Ray is needed.

    python benchmarks/memory_vs_plan.py --models qwen2.5vl:3B qwen3vl:8B qwen3.5:4B --modes lora qlora full
    python benchmarks/memory_vs_plan.py --tiny --device cpu     # a dry run of the code path on a CPU

Target: measured within 10% of predicted. Results go to benchmarks/results/memory_vs_plan-<gpu>-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from PIL import Image
from results_io import write_result

from vray.archs import registry
from vray.cluster import local_gpu
from vray.data.collate import Collator
from vray.data.sample import Sample
from vray.models.loader import load_processor, prepare_for_training
from vray.models.tiny import tiny_checkpoint
from vray.plan.gpus import Inventory
from vray.plan.planner import plan_run
from vray.spec import LoraBlock, validate_spec
from vray.testing.real_shaped import write_real_shaped_checkpoint

MODES = {"lora": ("LoRA", False), "qlora": ("LoRA", True), "full": ("Full", False)}


def sample_for(plan_assumptions: dict) -> tuple[Sample, Image.Image]:
    """A sample whose image yields the planned visual tokens and whose text fills the planned text tokens."""
    image = Image.new("RGB", (plan_assumptions["image_width"] or 448, plan_assumptions["image_height"] or 448),
                      (120, 80, 200))
    words = max(1, plan_assumptions["text_tokens"] // 2)
    question = " ".join(["colour"] * (words // 2))
    answer = " ".join(["red"] * (words - words // 2))
    sample = Sample.model_validate({"id": "bench", "task": "vqa", "images": ["in-memory"],
                                    "conversation": [{"role": "user", "text": question},
                                                     {"role": "assistant", "text": answer}]})
    return sample, image


def measure(arch_key: str, mode: str, device: torch.device, tiny: bool, steps: int, workdir: Path) -> dict:
    name, size = arch_key.split(":")
    arch = registry.get(name, size)
    training, quant = MODES[mode]
    spec = validate_spec({"architecture": {"name": name, "size": size}, "trainingMode": {"type": training},
                          "quantization": {"enabled": quant}, "hyperparameters": {"batchSize": 8}})
    found = local_gpu()
    gpu = found[0] if found else None
    if gpu is None:
        from vray.plan.gpus import gpu as catalog_gpu

        gpu = catalog_gpu("A100-80GB")  # dry run: plan as if on an A100
    plan = plan_run(spec, Inventory(gpu, 1, 1))
    record: dict = {"architecture": arch_key, "mode": mode, "gpu": gpu.name, "fits": plan.fits}
    if not plan.fits:
        record["reason"] = plan.reason
        return record
    record.update(strategy=plan.strategy, micro_batch=plan.micro_batch, gradient_checkpointing=plan.gradient_checkpointing,
                  predicted=plan.per_gpu_bytes.to_dict(), sample=plan.assumptions["sample"])
    folder = tiny_checkpoint(arch.model_type) if tiny else write_real_shaped_checkpoint(arch, workdir / arch_key.replace(":", "-"))
    processor = load_processor(folder)
    model, autocast = prepare_for_training(folder, arch, training, spec.compute.precisionType,
                                           {"enabled": quant, "type": "NF4"}, LoraBlock(), device,
                                           plan.gradient_checkpointing)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, **({"fused": True} if device.type == "cuda" else {}))
    collator = Collator(processor, arch, "You are a benchmark.")
    sample, image = sample_for(plan.assumptions)
    encoded = collator.encode(sample, images=[image])
    batch = {k: v.to(device) for k, v in collator.batch([encoded] * plan.micro_batch).items()}
    record["measured_sequence"] = int(batch["input_ids"].shape[1])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.time()
    for _ in range(steps):
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        record["measured_peak_bytes"] = peak
        record["predicted_over_measured"] = round(plan.per_gpu_bytes.total / peak, 4)
        record["within_10_percent"] = abs(plan.per_gpu_bytes.total - peak) <= 0.10 * peak
    else:
        record["measured_peak_bytes"] = None  # a CPU dry run checks the code path only
    record["seconds_per_step"] = round((time.time() - started) / steps, 3)
    del model, optimizer, batch
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["qwen2.5vl:3B", "qwen3vl:8B", "qwen3.5:4B"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="tiny checkpoints (a dry run of the code path)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    device = torch.device(args.device)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models:
            for mode in args.modes:
                try:
                    rec = measure(key, mode, device, args.tiny, args.steps, Path(tmp))
                except torch.cuda.OutOfMemoryError as exc:  # a plan that did not hold is a finding, not a crash
                    rec = {"architecture": key, "mode": mode, "out_of_memory": str(exc)[:300]}
                    torch.cuda.empty_cache()
                print(json.dumps(rec), flush=True)
                records.append(rec)
    gpu_name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu-dry-run"
    result = {
        "benchmark": "memory_vs_plan",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": gpu_name, "torch": torch.__version__, "tiny": args.tiny, "steps": args.steps,
        "target": "measured peak within 10% of the plan's per-GPU total",
        "records": records,
    }
    write_result(args.out, "memory_vs_plan", result, tag=gpu_name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
