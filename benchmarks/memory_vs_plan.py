"""Predicted against measured step memory, for the very sample trained: real-shaped checkpoints with random weights,
vray's own training step, without Ray (benchmarks/gpu_check.py runs it as a stage).

The sample (one `--image` px picture and text filling `--tokens` tokens) is encoded by the run's collator; the plan is
the planner's search for that exact shape on `--plan-gpu` (default: this machine's GPU), so its micro-batch and
checkpointing are those that GPU would get; vray's training worker (`vray.train.loop.Recipe`) then runs a few steps of
that plan on this machine's GPU. The prediction for the same sample and layout is compared with
`torch.cuda.max_memory_reserved` (what decides an out-of-memory: the allocator's reservation) and
`max_memory_allocated` (live tensors), and with the GPU's usable budget (its memory less the plan's margin).

- `single`: one GPU, ddp (default: Qwen3.5-9B, bf16 LoRA, batch 1, 4096 tokens, planned for an L4's 24 GB: does
  the reservation stay within the prediction?).
- `sharded`: fsdp2 over every visible GPU as local processes (vray.train.local); skipped, with the reason, on a
  machine with fewer than two GPUs (`--sharded-cpu` runs it over 2 gloo processes on the CPU, the code path only).

    python benchmarks/memory_vs_plan.py [--model qwen3.5:9B] [--plan-gpu L4-24GB] [--configs single sharded]
    python benchmarks/memory_vs_plan.py --cpu-smoke            # tiny checkpoint on the CPU: the code path only
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
for _path in (str(HERE), str(HERE.parent)):  # results_io, train_throughput, and vray from the working tree
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402
from train_throughput import (  # noqa: E402
    SMOKE_NOTE,
    benchmark_spec,
    checkpoint_for,
    kernels,
    meta_profile,
    parse_common,
    shape_of,
    sized_plan,
    vray_steps,
    worker_config,
    write_samples,
)

CONFIGS = ("single", "sharded")


def _rank_entry(job: tuple[Any, str, int, int]) -> None:
    """What each local process runs for the sharded configuration: vray's steps, its peaks into a file."""
    import torch.distributed as dist

    config, out, warmup, steps = job
    record = vray_steps(config, warmup, steps)
    Path(out, f"rank-{dist.get_rank()}.json").write_text(json.dumps(record))


def compare(predicted: int, run: dict[str, Any], usable: int | None) -> dict[str, Any]:
    """Prediction over measurement (reserved and allocated), and whether the reservation stays within them."""
    reserved, allocated = run.get("max_reserved_bytes"), run.get("max_allocated_bytes")
    if not reserved:
        return {"measured": None, "why": "no CUDA device: nothing measured (CPU smoke run)"}
    out = {"predicted_over_reserved": round(predicted / reserved, 4),
           "predicted_over_allocated": round(predicted / allocated, 4),
           "reserved_within_prediction": reserved <= predicted}
    if usable:
        out["reserved_within_usable_budget"] = reserved <= usable
    return out


def measure(arch_key: str, config: str, workdir: Path, smoke: bool, tokens: int, side: int, warmup: int, steps: int,
            plan_gpu: str | None = None, layers: int | None = None, checkpointing: str = "auto",
            sharded_cpu: bool = False, progress: Any = None) -> dict[str, Any]:
    """One configuration: the plan for the trained sample, the prediction, the measured peaks."""
    from vray.archs import registry
    from vray.train.loop import CollatorFactory

    progress = progress or (lambda record: None)
    name, size = arch_key.split(":")
    arch = registry.get(name, size)
    cuda = torch.cuda.is_available() and not smoke
    gpus = torch.cuda.device_count() if cuda else 0
    record: dict[str, Any] = {"architecture": arch.key, "config": config, "mode": "LoRA", "precision": "BFloat16",
                              "batch": 1, "kernels": kernels()}
    if config == "sharded":
        world = gpus if gpus >= 2 else (2 if sharded_cpu else 0)
        if world < 2:
            record.update(status="skipped", why=f"{gpus} GPU(s) visible: a sharded plan needs two or more")
            return record
        engine, backend = "fsdp2", "nccl" if cuda else "gloo"
    else:
        world, engine, backend = 1, None, None
    started = time.time()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    folder, record["checkpoint"] = checkpoint_for(arch, workdir, smoke, layers, device)
    record["write_s"] = round(time.time() - started, 1)
    count = (warmup + steps) * world
    data = workdir / "data" / "train.jsonl"
    spec = benchmark_spec(name, size, str(folder), data, workdir / "runs", world, tokens, checkpointing, None,
                          engine=engine, workers=world)
    collator = CollatorFactory.of(spec)()  # the training worker's own collator
    samples = write_samples(workdir / "data", collator, count, tokens, side, 0.25)
    data.write_text("".join(json.dumps(s.model_dump(mode="json", exclude_none=True)) + "\n" for s in samples))
    shape, scored = shape_of(collator.encode(samples[0]))
    profile = meta_profile(folder, arch)
    plan, est = sized_plan(spec, profile, shape, world, gpu_name=plan_gpu, on_gpu=cuda)
    record.update(sample={**shape.describe(), "scored_tokens": scored}, planned_for=plan.gpu,
                  plan={"strategy": plan.strategy, "workers": plan.num_workers, "micro_batch": plan.micro_batch,
                        "gradient_checkpointing": plan.gradient_checkpointing,
                        "checkpoint_every": plan.checkpoint_every, "pack_tokens": plan.pack_tokens},
                  predicted_step_bytes=est.memory.to_dict(), predicted_load_bytes=est.load.per_gpu,
                  usable_bytes=est.capacity - est.margin, plan_fits=est.fits)
    progress(record)
    job = worker_config(spec, plan, samples, workdir / "rows")
    if world == 1:
        run = vray_steps(job, warmup, steps)
    else:
        from vray.train.local import run_workers

        out = workdir / "ranks"
        out.mkdir(parents=True, exist_ok=True)
        run_workers((job, str(out), warmup, steps), world, backend=backend, entry=_rank_entry, timeout_s=300)
        ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(world)]
        run = {**ranks[0], "ranks": world,
               "max_reserved_bytes": max((r["max_reserved_bytes"] or 0) for r in ranks) or None,
               "max_allocated_bytes": max((r["max_allocated_bytes"] or 0) for r in ranks) or None}
    record["measured"] = run
    record["comparison"] = compare(est.memory.total, run, est.capacity - est.margin if cuda else None)
    record["status"] = "ok"
    record["seconds"] = round(time.time() - started, 1)
    return record


def main(argv: list[str] | None = None) -> int:
    from results_io import write_result

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3.5:9B")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--plan-gpu", default="L4-24GB", help="the catalog GPU the single-GPU plan is made for "
                        "('local': this machine's)")
    parser.add_argument("--sharded-cpu", action="store_true", help="the sharded configuration over 2 gloo processes")
    args = parse_common(parser, argv, steps=2)
    records = []
    for config in args.configs:
        with tempfile.TemporaryDirectory(prefix="vray-memory-") as tmp:
            try:
                rec = measure(args.model, config, Path(tmp), args.cpu_smoke, args.tokens, args.image, args.warmup,
                              args.steps, None if args.plan_gpu == "local" or config == "sharded" else args.plan_gpu,
                              args.layers, args.checkpointing, args.sharded_cpu)
            except torch.cuda.OutOfMemoryError as exc:  # a plan that did not hold is a finding, not a crash
                rec = {"architecture": args.model, "config": config, "status": "out_of_memory", "error": str(exc)[:300]}
                torch.cuda.empty_cache()
        print(json.dumps(rec, default=str), flush=True)
        records.append(rec)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.cpu_smoke else "cpu-smoke"
    result = {"benchmark": "memory_vs_plan", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": device, "cpu_smoke": args.cpu_smoke, "torch": torch.__version__,
              **({"note": SMOKE_NOTE} if args.cpu_smoke else {}),
              "question": "does max_memory_reserved stay within the plan's prediction for the same sample?",
              "records": records}
    out = args.out or str(HERE / "results" / ("tmp" if args.cpu_smoke else ""))
    write_result(out, "memory_vs_plan", result, tag=device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
