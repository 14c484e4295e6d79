"""Training throughput: vray's step against a plain Hugging Face loop on the same model and data, with MFU, HFU and
the common 6·N·T figure counted on the samples actually trained. Runs without Ray (one process; benchmarks/gpu_check.py
runs it as a stage).

The samples are written to disk (one `--image` px square picture, a question and an answer filling `--tokens`
tokens; `--answer-share` of the text is answer), encoded by the run's own collator, and their FLOPs counted from
the encoded tensors (text tokens, visual tokens, vision patches, scored positions) by `vray.plan.flops`, the count the
planner uses. The plan is sized for that sample (the search of `vray.plan.planner` on its exact shape), never the
planner's assumed one. vray's step is the training worker's own (`vray.train.loop.Recipe`: collation, loss,
engine; packing and the loss path are whatever the spec and plan select, or `--pack-tokens`). The plain loop loads
the same checkpoint with transformers and peft (same LoRA settings, default attention), and runs
`model(**batch, labels=labels).loss.backward()` and `optimizer.step()` over padded micro-batches of the same samples.

MFU = model FLOPs (no recompute) / (seconds x the GPU's dense bf16 peak); HFU adds the recompute of gradient
checkpointing; `six_nt_utilisation` is 6·N·T over the same peak (the common full-fine-tuning figure, labelled).

    python benchmarks/train_throughput.py                     # Qwen3-VL-8B-shaped LoRA, 4096 tokens, on a GPU
    python benchmarks/train_throughput.py --cpu-smoke         # tiny checkpoint on the CPU: the code path only
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
for _path in (str(HERE), str(HERE.parent)):  # results_io, and vray from the working tree
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402

SEQUENCE = 4096
IMAGE = 896
SMOKE_NOTE = ("CPU smoke run: a tiny checkpoint and a tiny sample on the CPU; it checks the code path, and none of its "
              "figures is a GPU measurement")
WORD = "colour"  # one token a word in the families' tiny tokenizers


# ---- the samples ----------------------------------------------------------------------------------------------


def _row(image: Path, question: int, answer: int, index: int) -> dict[str, Any]:
    return {"id": f"bench-{index}", "task": "vqa", "images": [str(image)], "conversation": [
        {"role": "user", "text": " ".join([WORD] * max(1, question))},
        {"role": "assistant", "text": " ".join(["red"] * max(1, answer))}]}


def write_samples(folder: Path, collator: Any, count: int, tokens: int, side: int, answer_share: float) -> list[Any]:
    """`count` samples of `tokens` tokens each as the collator encodes them (one `side` px image, the rest text, of
    which `answer_share` is answer), the picture on disk as a training run reads it."""
    from PIL import Image

    from vray.data.sample import Sample

    folder.mkdir(parents=True, exist_ok=True)
    image = folder / "image.png"
    Image.new("RGB", (side, side), (90, 140, 200)).save(image)
    picture = Image.open(image).convert("RGB")
    question, answer = 8, 8
    for _ in range(3):  # words -> tokens is nearly 1:1; two corrections land on the target
        length = collator.encode(Sample.model_validate(_row(image, question, answer, 0)), images=[picture]).length
        text = max(2, question + answer + tokens - length)
        answer = max(1, round(text * answer_share))
        question = max(1, text - answer)
    return [Sample.model_validate(_row(image, question, answer, i)) for i in range(count)]


def shape_of(encoded: Any) -> tuple[Any, int]:
    """The planner's SampleShape of one encoded sample (its exact tokens, visual tokens, patches, image size) and
    its scored positions."""
    from vray.data.collate import IGNORE_INDEX
    from vray.plan.memory import SampleShape

    t = encoded.tensors
    grid = t.get("image_grid_thw")
    patches = int(t["pixel_values"].shape[0]) if "pixel_values" in t else 0
    geometry = encoded.geometries[0] if encoded.geometries else None
    width, height = (geometry.resized_width, geometry.resized_height) if geometry else (0, 0)
    images = int(grid.shape[0]) if grid is not None else len(encoded.geometries)
    shape = SampleShape(text_tokens=encoded.length - encoded.visual_tokens, images=images, image_width=width,
                        image_height=height, frames=0, visual_tokens=encoded.visual_tokens, vision_patches=patches)
    scored = int((t["labels"][1:] != IGNORE_INDEX).sum())
    return shape, scored


def meta_profile(folder: Path, arch: Any) -> Any:
    """The planner's profile of exactly the checkpoint in `folder` (its layer count included)."""
    from vray.plan.profile import checkpoint_profile

    return checkpoint_profile(folder, arch)


# ---- the plan for this sample ---------------------------------------------------------------------------------


def peak_tflops() -> tuple[float, str]:
    """This machine's GPU's dense bf16 peak (the catalog's), or the H100's for a CPU smoke run."""
    from vray.cluster import local_gpu
    from vray.plan.gpus import CATALOG

    found = local_gpu()
    gpu = found[0] if found else CATALOG["H100-80GB"]
    return gpu.tflops, gpu.name


def sized_plan(spec: Any, profile: Any, shape: Any, world: int, pack_tokens: int | None = None,
               gpu_name: str | None = None, on_gpu: bool = True) -> tuple[Any, Any]:
    """The plan of `spec` on `world` GPUs of kind `gpu_name` (default: this machine's; an H100 for a CPU run) sized
    for `shape`, the sample the benchmark trains, by the planner's own search, and the memory estimate of that layout
    for that sample. When nothing fits without offload: micro-batch 1 with checkpointing on every layer (the
    closest layout), `fits` False in the estimate."""
    from vray.cluster import local_gpu
    from vray.plan.engine_config import deepspeed_config, fsdp_settings
    from vray.plan.gpus import CATALOG, Inventory
    from vray.plan.memory import Layout, estimate
    from vray.plan.plan import Plan
    from vray.plan.planner import search, step_estimate, workload_of

    found = local_gpu()
    gpu = CATALOG[gpu_name] if gpu_name else (found[0] if found else CATALOG["H100-80GB"])
    w = workload_of(spec)
    effective = spec.hyperparameters.effective_batch
    inventory = Inventory(gpu, world, 1)
    best = search(profile, w, shape, inventory, effective, workers=world, allow_offload=False,
                  only=spec.cluster.strategy, checkpointing=spec.cluster.gradientCheckpointing)
    if best is not None:
        layout, est = best.layout, best.est
    else:
        layout = Layout(spec.cluster.strategy or "ddp", world, world, 1, True)
        est = estimate(profile, w, layout, shape, gpu.memory_bytes, inventory.host_memory_per_gpu)
    pack = spec.data.packTokens if pack_tokens is None else pack_tokens
    plan = Plan(
        fits=True, strategy=layout.strategy, device="gpu" if on_gpu and torch.cuda.is_available() else "cpu", num_workers=world, nodes=1,
        gpus_per_node=world, micro_batch=layout.micro_batch, grad_accum=effective // (layout.micro_batch * world),
        gradient_checkpointing=layout.gradient_checkpointing, cpus_per_worker=2, gpu=gpu.name,
        per_gpu_bytes=est.memory, capacity_bytes=est.capacity, margin_bytes=est.margin,
        assumptions={**shape.describe(), "sized_for": "the benchmark's own sample (its encoded shape)"},
        estimate=step_estimate(profile, w, layout, shape, gpu, effective, effective, 1),
        deepspeed=deepspeed_config(layout, spec, profile, w) if layout.strategy.startswith("zero") else None,
        fsdp=fsdp_settings(layout, w) if layout.strategy.startswith("fsdp2") else None,
        load_peak_bytes=est.load, checkpoint_every=getattr(layout, "checkpoint_every", 1),
        pack_tokens=pack or None,
    )
    return plan, est


# ---- the two loops --------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset(device: torch.device) -> None:
    gc.collect()  # what the previous measurement left unreferenced goes before the peaks start again
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peaks(device: torch.device) -> dict[str, int | None]:
    if device.type != "cuda":
        return {"max_reserved_bytes": None, "max_allocated_bytes": None}
    return {"max_reserved_bytes": torch.cuda.max_memory_reserved(device),
            "max_allocated_bytes": torch.cuda.max_memory_allocated(device)}


def kernels() -> dict[str, bool]:
    """Which optional kernels this machine has (they change both speed and memory)."""
    return {m: importlib.util.find_spec(m) is not None for m in ("flash_attn", "liger_kernel", "fla", "causal_conv1d")}


def vray_steps(config: Any, warmup: int, steps: int) -> dict[str, Any]:
    """`warmup` then `steps` timed optimizer steps of vray's training worker (this process is its rank) over the
    config's samples; the step peaks (GPU) and the losses."""
    from vray.train.loop import LocalReporter, Recipe

    cuda = config.plan.device == "gpu" and torch.cuda.is_available()
    if cuda:  # this rank's GPU (LOCAL_RANK, as the worker picks it), its peaks from zero
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(local)
        _reset(local)
    recipe = Recipe(config, LocalReporter())
    recipe.setup()
    device = recipe.device
    load = peaks(device)  # model, adapters, engine and optimizer set up
    batches = recipe.stream.steps(0, warmup + steps)
    _reset(device)
    losses = [recipe._train_step(next(batches)) for _ in range(warmup)]
    _sync(device)
    started, waited = time.perf_counter(), recipe.stream.wait_seconds
    losses += [recipe._train_step(next(batches)) for _ in range(steps)]
    _sync(device)
    seconds = time.perf_counter() - started
    out = {"seconds_per_step": seconds / max(steps, 1), "timed_steps": steps, **peaks(device), "setup_peaks": load,
           "data_wait_share": round((recipe.stream.wait_seconds - waited) / max(seconds, 1e-9), 4),
           "losses": [round(float(v), 4) for v in losses], "device": str(device),
           "gradient_checkpointing": config.plan.gradient_checkpointing, "micro_batch": config.plan.micro_batch,
           "pack_tokens": config.plan.pack_tokens, "strategy": config.plan.strategy}
    recipe.metrics_log.close()
    del recipe, batches
    _reset(device)
    return out


def hf_steps(folder: Path, spec: Any, encoded: list[Any], collator: Any, micro_batch: int, warmup: int, steps: int,
             device: torch.device, gradient_checkpointing: bool = False) -> dict[str, Any]:
    """A plain Hugging Face loop on the same checkpoint and samples: transformers + peft (the spec's LoRA settings,
    the default attention), padded micro-batches, `model(**batch, labels=...).loss.backward()`, AdamW step."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    arch = spec.arch
    dtype = {"BFloat16": torch.bfloat16, "Float16": torch.float16}.get(spec.compute.precisionType, torch.float32)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype).to(device)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    lora = spec.lora
    model = get_peft_model(model, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=arch.lora_target_regex(lora.targets)))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    per_step = spec.hyperparameters.effective_batch
    accum = max(1, per_step // micro_batch)

    def step(index: int) -> float:
        rows = [encoded[(index * per_step + i) % len(encoded)] for i in range(per_step)]
        total = 0.0
        for m in range(accum):
            batch = collator.batch(rows[m * micro_batch:(m + 1) * micro_batch])
            labels = batch.pop("labels").to(device)
            loss = model(**{k: v.to(device) for k, v in batch.items()}, labels=labels).loss / accum
            loss.backward()
            total += float(loss.detach())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    _reset(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None  # what vray's run left, if any
    losses = [step(i) for i in range(warmup)]
    _sync(device)
    started = time.perf_counter()
    losses += [step(warmup + i) for i in range(steps)]
    _sync(device)
    seconds = time.perf_counter() - started
    out = {"seconds_per_step": seconds / max(steps, 1), "timed_steps": steps, **peaks(device),
           "losses": [round(v, 4) for v in losses], "micro_batch": micro_batch, "allocated_before_bytes": before,
           "gradient_checkpointing": gradient_checkpointing, "attn_implementation": model.config._attn_implementation}
    model = optimizer = None  # freed before the next measurement
    _reset(device)
    return out


# ---- one measurement ------------------------------------------------------------------------------------------


def benchmark_spec(name: str, size: str, source: str, data: Path, run_root: Path, batch: int, tokens: int,
                   checkpointing: str, pack_tokens: int | None, engine: str | None = None, workers: int = 1) -> Any:
    from vray.spec import validate_spec

    return validate_spec({
        "architecture": {"name": name, "size": size}, "model": {"source": source},
        "trainingMode": {"type": "LoRA"}, "compute": {"precisionType": "BFloat16"}, "task": "vqa",
        "data": {"train": str(data), "maxTokens": tokens + 512,
                 **({} if pack_tokens is None else {"packTokens": pack_tokens})},
        "hyperparameters": {"epochs": 1, "learningRate": 1e-5, "batchSize": batch}, "lora": {"dropout": 0.0},
        "checkpointing": {"everySteps": 10**6},
        "cluster": {"workers": workers, "gradientCheckpointing": checkpointing,
                    **({"strategy": engine} if engine else {})},
        "output": str(run_root), "name": f"{name}-{size}-bench".replace(".", "_"),
    }).resolved()


def checkpoint_for(arch: Any, workdir: Path, smoke: bool, layers: int | None, device: torch.device) -> tuple[Path, str]:
    from vray.models.tiny import tiny_checkpoint
    from vray.testing.real_shaped import write_real_shaped_checkpoint

    if smoke:
        return Path(tiny_checkpoint(arch.model_type)), f"tiny:{arch.model_type} (smoke: not the real shape)"
    text = arch.config.get("text_config", arch.config)
    folder = write_real_shaped_checkpoint(arch, workdir / "checkpoint", text_layers=layers, device=str(device))
    kept = layers or text["num_hidden_layers"]
    return folder, (f"real widths, vocabulary and vision tower, random bf16 weights; {kept} of "
                    f"{text['num_hidden_layers']} language-model layers")


def worker_config(spec: Any, plan: Any, samples: list[Any], rows: Path) -> Any:
    from vray.data.pipeline import SampleRows
    from vray.train.loop import WorkerConfig

    return WorkerConfig(spec=spec, plan=plan, run_dir=spec.run_dir,
                        train=SampleRows.in_folder(spec.data.train, samples, rows), eval=None)


def measure(arch_key: str, workdir: Path, smoke: bool, tokens: int, side: int, batch: int, warmup: int, steps: int,
            layers: int | None = None, answer_share: float = 0.25, checkpointing: str = "auto",
            pack_tokens: int | None = None, hf: bool = True, progress: Any = None) -> dict[str, Any]:
    """vray's step and the plain loop on one real-shaped (or, smoke, tiny) checkpoint: the record. `progress` is
    called with the record so far after each phase (a stage that runs out of time keeps what it measured)."""
    from vray.archs import registry
    from vray.plan.flops import count_flops
    from vray.plan.planner import workload_of
    from vray.train.loop import CollatorFactory

    progress = progress or (lambda record: None)
    name, size = arch_key.split(":")
    arch = registry.get(name, size)
    device = torch.device("cuda", 0) if torch.cuda.is_available() and not smoke else torch.device("cpu")
    record: dict[str, Any] = {"architecture": arch.key, "mode": "LoRA", "precision": "BFloat16", "kernels": kernels()}
    started = time.time()
    folder, record["checkpoint"] = checkpoint_for(arch, workdir, smoke, layers, device)
    record["write_s"] = round(time.time() - started, 1)
    count = (warmup + steps) * batch
    data = workdir / "data" / "train.jsonl"
    spec = benchmark_spec(name, size, str(folder), data, workdir / "runs", batch, tokens, checkpointing, pack_tokens)
    collator = CollatorFactory.of(spec)()  # the training worker's own collator
    samples = write_samples(workdir / "data", collator, count, tokens, side, answer_share)
    data.write_text("".join(json.dumps(s.model_dump(mode="json", exclude_none=True)) + "\n" for s in samples))
    encoded = [collator.encode(s) for s in samples]
    shape, scored = shape_of(encoded[0])  # every sample is the same
    profile = meta_profile(folder, arch)
    plan, est = sized_plan(spec, profile, shape, 1, on_gpu=device.type == "cuda")
    w = workload_of(spec)
    every = plan.checkpoint_every if plan.gradient_checkpointing else 0
    per_sample = count_flops(profile, w, shape, every, scored)
    record.update(sample={**shape.describe(), "scored_tokens": scored}, samples_per_step=batch,
                  plan={"strategy": plan.strategy, "micro_batch": plan.micro_batch, "grad_accum": plan.grad_accum,
                        "gradient_checkpointing": plan.gradient_checkpointing, "checkpoint_every": plan.checkpoint_every,
                        "pack_tokens": plan.pack_tokens},
                  predicted_step_bytes=est.memory.to_dict(), flops_per_sample=per_sample.to_dict())
    progress(record)
    peak, gpu_name = peak_tflops()
    record["peak_tflops"] = {"value": peak, "gpu": gpu_name, "what": "dense bf16 peak of the catalog entry"
                             + ("" if device.type == "cuda" else " (CPU smoke run: the utilisations are meaningless)")}

    def rates(run: dict[str, Any]) -> dict[str, Any]:
        sps = batch / max(run["seconds_per_step"], 1e-12)
        return {"tokens_per_s": round(sps * shape.sequence, 1), "samples_per_s": round(sps, 4),
                "mfu": round(sps * per_sample.model / (peak * 1e12), 4),
                "hfu": round(sps * per_sample.hardware / (peak * 1e12), 4),
                "six_nt_utilisation": round(sps * per_sample.six_nt / (peak * 1e12), 4)}

    vray = vray_steps(worker_config(spec, plan, samples, workdir / "rows"), warmup, steps)
    vray.update(rates(vray))
    if vray["max_reserved_bytes"]:
        vray["predicted_over_measured"] = {"reserved": round(est.memory.total / vray["max_reserved_bytes"], 4),
                                           "allocated": round(est.memory.total / vray["max_allocated_bytes"], 4)}
    record["vray"] = vray
    progress(record)
    if hf:
        try:
            plain = hf_steps(folder, spec, encoded, collator, plan.micro_batch, warmup, steps, device)
            plain.update(rates(plain))
        except torch.cuda.OutOfMemoryError as exc:  # the plain loop not fitting is a finding
            plain = {"out_of_memory": str(exc)[:300]}
            _reset(device)
        except Exception as exc:  # noqa: BLE001 - so is a plain loop that fails; vray's figures stand
            plain = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
            _reset(device)
        record["hf"] = plain
        if "tokens_per_s" in plain:
            record["vray_over_hf_tokens_per_s"] = round(vray["tokens_per_s"] / max(plain["tokens_per_s"], 1e-9), 3)
    record["seconds"] = round(time.time() - started, 1)
    return record


def parse_common(parser: argparse.ArgumentParser, argv: list[str] | None, steps: int) -> argparse.Namespace:
    """The sample, checkpoint and run arguments both benchmarks take; --cpu-smoke shrinks them."""
    parser.add_argument("--tokens", type=int, default=SEQUENCE, help="tokens of each sample (text + visual)")
    parser.add_argument("--image", type=int, default=IMAGE, help="side in px of each sample's square image")
    parser.add_argument("--layers", type=int, default=None, help="language-model layers kept (default: all)")
    parser.add_argument("--checkpointing", default="auto", help="cluster.gradientCheckpointing")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=steps, help="timed steps after the warm-up")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny checkpoint, tiny sample, CPU: the code path")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        args.tokens, args.image, args.steps = min(args.tokens, 96), min(args.image, 56), min(args.steps, 1)
    return args


def main(argv: list[str] | None = None) -> int:
    from results_io import write_result

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen3vl:8B")
    parser.add_argument("--batch", type=int, default=1, help="samples per optimizer step")
    parser.add_argument("--answer-share", type=float, default=0.25, help="share of the text that is answer")
    parser.add_argument("--pack-tokens", type=int, default=None, help="data.packTokens (default: the spec's)")
    parser.add_argument("--no-hf", action="store_true", help="skip the plain Hugging Face loop")
    args = parse_common(parser, argv, steps=3)
    with tempfile.TemporaryDirectory(prefix="vray-throughput-") as tmp:
        record = measure(args.model, Path(tmp), args.cpu_smoke, args.tokens, args.image, args.batch, args.warmup,
                         args.steps, args.layers, args.answer_share, args.checkpointing, args.pack_tokens,
                         hf=not args.no_hf)
    print(json.dumps(record, indent=1, default=str))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.cpu_smoke else "cpu-smoke"
    result = {"benchmark": "train_throughput", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": device, "cpu_smoke": args.cpu_smoke, "torch": torch.__version__,
              **({"note": SMOKE_NOTE} if args.cpu_smoke else {}),
              "flops_convention": "vray.plan.flops (README, Benchmarks)", "target": "vray >= 1.3x the plain loop's "
              "tokens/s; strict MFU >= 0.35 for Qwen3-VL-8B LoRA at 4096 tokens on one H100/H200", "records": [record]}
    out = args.out or str(HERE / "results" / ("tmp" if args.cpu_smoke else ""))
    write_result(out, "train_throughput", result, tag=device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
