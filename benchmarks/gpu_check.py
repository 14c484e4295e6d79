"""The GPU check: what one GPU can show about vray's training path, in at most 5 minutes, without Ray.

It installs what the machine lacks from a folder of wheels (`benchmarks/gpu_wheels.sh` builds it), then runs each
part in its own process, under its own time limit and within the run's 5-minute cap:

- `throughput:qwen3vl:8B` (benchmarks/train_throughput.py): Qwen3-VL-8B-shaped LoRA (real widths, vocabulary and
  vision tower, random weights; all its layers unless `--layers`) at `--tokens` tokens with one `--image` px
  picture, planned for that very sample: vray's training step against a plain Hugging Face loop on the same model
  and data; tokens/s, strict MFU, HFU and the common 6·N·T figure (vray.plan.flops), step peaks against the
  prediction.
- `memory:qwen3.5:9B` (benchmarks/memory_vs_plan.py): Qwen3.5-9B bf16 LoRA at batch 1 on the same sample size,
  planned for a 24 GB L4; `max_memory_reserved` and `max_memory_allocated` against the prediction for that sample.
- `memory:sharded`: the same under fsdp2 over every visible GPU as local processes (skipped, with the reason, on
  fewer than two GPUs).
- `qlora_dequantize`: NF4 weights quantised on the GPU, dequantised on the GPU and on the CPU: bit-identical?
  (what a QLoRA export on the CPU relies on); and whether quantising on the CPU gives the same codes.
- `fsdp2_fused_adamw`: one step of vray's FSDP2 engine on a 1-GPU mesh with the fused AdamW it uses on GPUs.
- `fsdp2_lora_experts`: one step of `lora.experts` (LoRA on the fused routed experts) under FSDP2, on a tiny MoE.

    benchmarks/gpu_wheels.sh && python benchmarks/gpu_check.py --wheels benchmarks/wheels
    python benchmarks/gpu_check.py --cpu-smoke --out /tmp/x     # the same code paths at tiny sizes on a CPU

The result, per part what ran, what was skipped and why, goes to benchmarks/results/gpu_check-<date>.json
(`--cpu-smoke`, or a machine without CUDA, which it says and exits 0: benchmarks/results/tmp/, which git ignores).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (str(HERE), str(ROOT)):  # results_io, and vray from the working tree (it need not be installed)
    if path not in sys.path:
        sys.path.insert(0, path)

CAP_S = 290  # the whole run, install included: under 5 minutes
# Each part's own limit, in the order they run: the figures first, the sharded configuration (several GPUs only) last.
PARTS: dict[str, int] = {
    "throughput:qwen3vl:8B": 125,
    "memory:qwen3.5:9B": 100,
    "qlora_dequantize": 30,
    "fsdp2_fused_adamw": 40,
    "fsdp2_lora_experts": 40,
    "memory:sharded": 100,
}
# Importable module -> the distribution whose wheel brings it: what vray's per-worker code and these parts import
# beyond torch and transformers.
NEEDED = {
    "pydantic": "pydantic", "pydantic_core": "pydantic_core", "annotated_types": "annotated_types",
    "typing_inspection": "typing_inspection", "hjson": "hjson", "peft": "peft", "accelerate": "accelerate",
    "cpuinfo": "py_cpuinfo", "msgpack": "msgpack", "ninja": "ninja", "einops": "einops", "psutil": "psutil",
    "deepspeed": "deepspeed", "PIL": "pillow",
}
OPTIONAL = {"bitsandbytes": "bitsandbytes"}  # only the QLoRA part needs it


# ---- the orchestrating process ---------------------------------------------------------------------------------


def _findable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # an import hook refuses it
        return False


def _missing(modules: dict[str, str]) -> dict[str, str]:
    return {m: d for m, d in modules.items() if not _findable(m)}


def install_wheels(folder: Path | None) -> dict[str, Any]:
    """Install, from `folder` only, the wheels of what is missing, into a folder of their own (no write access to
    the machine's Python needed); this process and its parts import from there."""
    wanted = {**_missing(NEEDED), **_missing(OPTIONAL)}
    record: dict[str, Any] = {"missing_before": sorted(wanted.values()), "installed": [], "folder": str(folder)}
    if not wanted:
        return record
    if folder is None or not folder.is_dir():
        record["error"] = "missing packages and no --wheels folder; run benchmarks/gpu_wheels.sh and carry its folder"
        return record
    files = []
    for dist in wanted.values():
        found = sorted(folder.glob(f"{dist}-*.whl")) or sorted(folder.glob(f"{dist.replace('_', '-')}-*.whl"))
        if found:
            files.append(str(found[-1]))
        else:
            record.setdefault("no_wheel", []).append(dist)
    target = Path(tempfile.gettempdir()) / "vray-gpu-check-site"  # not in the carried folder
    if files:
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                               "--upgrade", "--target", str(target), "--find-links", str(folder), *files],
                              capture_output=True, text=True, timeout=150)
        record["installed"] = [Path(f).name for f in files] if done.returncode == 0 else []
        if done.returncode != 0:
            record["error"] = done.stderr[-2000:]
    if target.is_dir():
        sys.path.insert(0, str(target))
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(target), os.environ.get("PYTHONPATH")) if p)
        record["site"] = str(target)
    importlib.invalidate_caches()
    record["still_missing"] = sorted({**_missing(NEEDED), **_missing(OPTIONAL)}.values())
    return record


def environment(smoke: bool) -> dict[str, Any]:
    import torch
    import transformers

    cuda = torch.cuda.is_available() and not smoke
    return {
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "gpu_memory_bytes": torch.cuda.get_device_properties(0).total_memory if cuda else None,
        "cuda": torch.version.cuda, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "ray_importable": _findable("ray"),
        "torchvision_importable": _findable("torchvision"),
    }


def run_part(name: str, args: argparse.Namespace, limit: float) -> dict[str, Any]:
    """One part in its own process (its own CUDA context and memory peaks), ended at its limit."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        out = Path(tmp) / "part.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--part-out", str(out),
                   "--tokens", str(args.tokens), "--image", str(args.image), "--steps", str(args.steps),
                   "--workdir", tmp] + (["--layers", str(args.layers)] if args.layers else []) + (
                       ["--cpu-smoke"] if args.cpu_smoke else [])
        started = time.time()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired as exc:
            tail = (exc.stderr or b"")[-1500:]
            partial = json.loads(out.read_text()) if out.exists() else {}  # what the part measured before its limit
            return {**partial, "status": "timeout", "limit_s": round(limit), "stderr_tail": tail.decode(
                errors="replace") if isinstance(tail, bytes) else tail}
        record = json.loads(out.read_text()) if out.exists() else {"status": "failed"}
        record["seconds"] = round(time.time() - started, 1)
        if done.returncode != 0 and record.get("status") != "failed":
            record["status"] = "failed"
        if record["status"] == "failed":
            record["stderr_tail"] = done.stderr[-3000:]
        return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, default=HERE / "wheels", help="folder of wheels to install from")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU: the code paths only")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--layers", type=int, default=None, help="language-model layers kept of the real checkpoints "
                        "(default: all)")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens (text and visual) of each training sample")
    parser.add_argument("--image", type=int, default=896, help="side in pixels of the sample's square image")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up step")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--part-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        args.tokens, args.image, args.steps = min(args.tokens, 96), min(args.image, 56), min(args.steps, 1)
    if args.part:
        return part_main(args)

    started = time.time()
    result: dict[str, Any] = {
        "benchmark": "gpu_check", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu_smoke": args.cpu_smoke, "cap_s": CAP_S,
        "settings": {"text_layers": args.layers, "text_tokens": args.tokens, "image_px": args.image,
                     "timed_steps": args.steps},
    }
    result["install"] = install_wheels(args.wheels)
    result.update(environment(args.cpu_smoke))
    import torch

    no_gpu = not args.cpu_smoke and not torch.cuda.is_available()
    if no_gpu:
        print("no CUDA device on this machine: nothing is measured (--cpu-smoke runs the code paths on the CPU); "
              "the result, every part skipped, goes to benchmarks/results/tmp/", flush=True)
    parts: dict[str, Any] = {}
    for name in PARTS:
        if name not in args.parts:
            parts[name] = {"status": "skipped", "why": "not asked for (--parts)"}
            continue
        if no_gpu:
            parts[name] = {"status": "skipped", "why": "no GPU (use --cpu-smoke for the code paths)"}
            continue
        left = CAP_S - (time.time() - started)
        if left < 20:
            parts[name] = {"status": "skipped", "why": f"the run's {CAP_S}s cap left {left:.0f}s"}
            continue
        parts[name] = run_part(name, args, min(PARTS[name], left))
        print(json.dumps({name: parts[name]})[:2000], flush=True)
    result["parts"] = parts
    result["seconds"] = round(time.time() - started, 1)
    from results_io import write_result

    out = args.out or (HERE / "results" / ("tmp" if args.cpu_smoke or no_gpu else ""))  # only GPU results commit
    write_result(out, "gpu_check", result)
    return 0 if all(p["status"] in ("ok", "skipped") for p in parts.values()) else 1


# ---- one part, in its own process ------------------------------------------------------------------------------


def part_main(args: argparse.Namespace) -> int:
    record: dict[str, Any]
    try:
        if args.part.startswith(("throughput:", "memory:")):
            record = part_benchmark(args)
        else:
            record = {"qlora_dequantize": part_qlora, "fsdp2_fused_adamw": part_fsdp2_fused_adamw,
                      "fsdp2_lora_experts": part_fsdp2_lora_experts}[args.part](args)
    except Exception as exc:  # noqa: BLE001 - a part's failure is a finding, recorded with its traceback
        partial = json.loads(args.part_out.read_text()) if args.part_out.exists() else {}  # what it measured first
        record = {**partial, "status": "failed", "error": f"{type(exc).__name__}: {exc}"[:2000],
                  "traceback": traceback.format_exc()[-4000:]}
    args.part_out.write_text(json.dumps(record, indent=2, default=str))
    return 0 if record.get("status") in ("ok", "skipped") else 1


def _device(args: argparse.Namespace) -> Any:
    import torch

    if args.cpu_smoke:
        return torch.device("cpu")
    torch.cuda.set_device(0)
    return torch.device("cuda", 0)


def _sample(tokens: int, side: int) -> tuple[Any, Any]:
    """A one-image VQA sample whose text is about `tokens` tokens (the collator says exactly how many)."""
    from PIL import Image

    from vray.data.sample import Sample

    words = max(2, tokens)
    question = " ".join(["What colour is the square?"] * max(1, words // 12))
    answer = " ".join(["red"] * max(1, words // 2))
    sample = Sample.model_validate({"id": "gpu-check", "task": "vqa", "images": ["in-memory"],
                                    "conversation": [{"role": "user", "text": question},
                                                     {"role": "assistant", "text": answer}]})
    return sample, Image.new("RGB", (side, side), (120, 80, 200))


def _batch(collator: Any, tokens: int, side: int, device: Any) -> dict[str, Any]:
    """A training batch of one sample."""
    sample, image = _sample(tokens, side)
    return {k: v.to(device) for k, v in collator.batch([collator.encode(sample, images=[image])]).items()}


def part_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """A stage of benchmarks/train_throughput.py or benchmarks/memory_vs_plan.py; what it measured so far is written
    to the part's file after each phase, so a stage ended at its limit keeps it."""
    import memory_vs_plan
    import train_throughput

    def progress(record: dict[str, Any]) -> None:
        args.part_out.write_text(json.dumps(record, indent=2, default=str))

    kind, rest = args.part.split(":", 1)
    common = {"workdir": args.workdir, "smoke": args.cpu_smoke, "tokens": args.tokens, "side": args.image,
              "warmup": 1, "layers": args.layers, "progress": progress}
    if kind == "throughput":
        record = train_throughput.measure(rest, batch=1, steps=args.steps, **common)
        ok = all(math.isfinite(v) for run in ("vray", "hf") for v in record.get(run, {}).get("losses", []))
    elif rest == "sharded":
        record = memory_vs_plan.measure("qwen3vl:8B", "sharded", steps=1, **common)
        ok = record.get("status") in ("ok", "skipped")
    else:
        record = memory_vs_plan.measure(rest, "single", steps=1, plan_gpu="L4-24GB", **common)
        ok = all(math.isfinite(v) for v in record["measured"]["losses"])
    if record.get("status") == "skipped":
        return record
    return {**record, "status": "ok" if ok else "failed", **({} if ok else {"error": "a non-finite loss"})}


def part_qlora(args: argparse.Namespace) -> dict[str, Any]:
    """NF4 (double-quantised, as vray loads QLoRA bases) quantised on the GPU; dequantised there and on the CPU."""
    import copy

    import torch

    if not _findable("bitsandbytes"):
        return {"status": "skipped", "why": "bitsandbytes is not installed and its wheel was not carried "
                "(benchmarks/gpu_wheels.sh --qlora, if it fits the 64 MiB)"}
    import bitsandbytes.functional as F

    device = _device(args)
    shape = (256, 512) if args.cpu_smoke else (4096, 4096)
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
    codes, state = F.quantize_4bit(weight.to(device), blocksize=64, compress_statistics=True, quant_type="nf4")
    on_device = F.dequantize_4bit(codes, state).cpu()
    cpu_state = copy.deepcopy(state)
    cpu_state.to(torch.device("cpu"))
    on_cpu = F.dequantize_4bit(codes.cpu(), cpu_state)
    cpu_codes, cpu_quant_state = F.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    same_codes = torch.equal(cpu_codes, codes.cpu())
    record = {
        "weight": list(shape), "quantised_on": str(device), "quant_type": "nf4", "double_quant": True,
        "dequantised_identical": torch.equal(on_device, on_cpu),
        "max_abs_difference": float((on_device.float() - on_cpu.float()).abs().max()),
        "cpu_quantisation_same_codes": same_codes,
        "cpu_quantisation_max_abs_difference": float(
            (F.dequantize_4bit(cpu_codes, cpu_quant_state).float() - on_cpu.float()).abs().max()),
        "smoke": args.cpu_smoke,
    }
    record["status"] = "ok"
    return record


def _process_group(device: Any) -> None:
    import torch.distributed as dist

    from vray.cluster import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def _fsdp2_step(family: str, name: str, size: str, mode: str, experts: bool, args: argparse.Namespace) -> tuple[
        dict[str, Any], Any]:
    """One optimizer step of vray's FSDP2 engine on a 1-rank mesh, on a tiny checkpoint."""
    import torch
    import torch.distributed as dist

    from vray.archs import registry
    from vray.data.collate import Collator
    from vray.models.loader import load_processor, parameter_groups, prepare_for_training
    from vray.models.tiny import tiny_checkpoint
    from vray.spec import validate_spec
    from vray.train.engines import build_engine, shard_units
    from vray.train.loop import build_optimizer

    device = _device(args)
    _process_group(device)
    try:
        arch = registry.get(name, size)
        folder = tiny_checkpoint(family)
        spec = validate_spec({"architecture": {"name": name, "size": size}, "trainingMode": {"type": mode},
                              "compute": {"precisionType": "BFloat16"}, "lora": {"experts": experts, "dropout": 0.0}})
        model, autocast = prepare_for_training(folder, arch, mode, "BFloat16", spec.quantization, spec.lora, device)
        model.train()
        hp = spec.hyperparameters
        engine = build_engine(
            "fsdp2", model, lambda m: build_optimizer(hp.optimizer, parameter_groups(m, arch, 1e-2), 1e-2, 0.0, device),
            1.0, device, "BFloat16", fsdp={"mesh": [1]},
            units=shard_units(model, arch.language_model_prefix, arch.vision_modules))
        engine.attach_scheduler(lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
        processor = load_processor(folder)
        batch = _batch(Collator(processor, arch, "You are a GPU check."), 24, 56, device)
        trainable = {n: p for n, p in engine.model.named_parameters() if p.requires_grad}
        before = {n: p.detach().full_tensor().float().clone() if hasattr(p, "full_tensor") else p.detach().float().clone()
                  for n, p in trainable.items()}
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            loss = engine.module(**batch).loss
        engine.backward(loss)  # one micro-batch on one rank: the mean over its answer tokens
        norm = engine.step()
        after = {n: p.detach().full_tensor().float() if hasattr(p, "full_tensor") else p.detach().float()
                 for n, p in trainable.items()}
        changed = {n for n in trainable if not torch.equal(before[n], after[n])}
        record = {
            "checkpoint": f"tiny:{family}", "mode": mode, "mesh": [1], "loss": float(loss.detach()),
            "grad_norm": float(norm), "dtensor_parameters": sum(type(p).__name__ == "DTensor" for p in trainable.values()),
            "trainable_tensors": len(trainable), "changed_tensors": len(changed),
            "optimizer_fused": [bool(g.get("fused")) for g in engine.optimizer.param_groups],
        }
        return record, (trainable, changed)
    finally:
        dist.destroy_process_group()


def part_fsdp2_fused_adamw(args: argparse.Namespace) -> dict[str, Any]:
    """Full fine-tuning, so every decoder weight is an fp32 DTensor shard stepped by AdamW(fused=True) on a GPU."""
    record, (trainable, changed) = _fsdp2_step("qwen3_vl", "qwen3vl", "2B", "Full", False, args)
    fused_expected = not args.cpu_smoke
    ok = (math.isfinite(record["loss"]) and record["dtensor_parameters"] == len(trainable) and len(changed) > 0
          and all(f == fused_expected for f in record["optimizer_fused"]))
    return {**record, "status": "ok" if ok else "failed",
            **({} if ok else {"error": "a step did not update the shards with the expected optimizer"})}


def part_fsdp2_lora_experts(args: argparse.Namespace) -> dict[str, Any]:
    """LoRA on the fused routed experts (peft target_parameters) under FSDP2: the expert adapters must train."""
    record, (trainable, changed) = _fsdp2_step("qwen3_vl_moe", "qwen3vl", "30B-A3B", "LoRA", True, args)
    experts = [n for n in trainable if "experts" in n]
    record["expert_adapter_tensors"] = len(experts)
    record["expert_adapters_changed"] = len([n for n in experts if n in changed])
    ok = math.isfinite(record["loss"]) and experts and record["expert_adapters_changed"] > 0
    return {**record, "status": "ok" if ok else "failed",
            **({} if ok else {"error": "no expert adapter was updated by the step"})}


if __name__ == "__main__":
    sys.exit(main())
