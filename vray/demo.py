"""`vray demo`: fine-tune a tiny Qwen2.5-VL with LoRA on Ray, serve it over HTTP, ask it a question.

Everything runs locally: a Ray cluster on this machine, two CPU workers (DDP over gloo), the tiny
real-architecture checkpoint `tiny:qwen2_5_vl`, the `synthetic:vqa` coloured-shapes dataset, Ray Serve on
127.0.0.1. It prints the held-out exact match before and after fine-tuning and the endpoint's answer.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from vray.cluster import free_port
from vray.data.io import read_jsonl
from vray.spec import RunSpec, load_spec
from vray.storage.rundir import RunDir

DEMO_SPEC: dict[str, Any] = {
    "architecture": {"name": "qwen2.5vl", "size": "3B"},
    "model": {"source": "tiny:qwen2_5_vl"},
    "trainingMode": {"type": "LoRA"},
    # CPU workers: full precision (bf16 matmuls are slow on most CPUs and fp16 needs a GPU).
    "compute": {"precisionType": "Float32"},
    "hyperparameters": {"epochs": 8, "learningRate": 3e-3, "batchSize": 8, "gradientAccumulation": 1,
                        "optimizer": "AdamW"},
    "evaluation": {"maxNewTokens": 8, "temperature": 0, "topP": 1.0, "topK": 50, "repetitionPenalty": 1.0},
    "task": "vqa",
    "data": {"train": "synthetic:vqa"},
    "cluster": {"workers": 2, "cpusPerWorker": 1},
}


@dataclass(frozen=True)
class DemoResult:
    """What the demo measured."""

    run_dir: str
    exact_match_before: float
    exact_match_after: float
    question: str
    expected: str
    answer: str
    url: str
    model_id: str
    seconds: dict[str, float]


def demo_spec(output: str | None = None, overrides: list[str] | None = None, name: str | None = None) -> RunSpec:
    """The embedded demo spec, with optional output folder, run name and `--set` overrides."""
    base = dict(DEMO_SPEC)
    if name:
        base["name"] = name
    return load_spec(base=base, output=output, overrides=overrides)


def held_out_metric(run: RunDir, key: str) -> tuple[float, float]:
    """(metric before any training step, best metric after) from metrics.jsonl."""
    evals = [r for r in run.read_metrics() if key in r]
    if not evals:
        raise RuntimeError(f"{run.metrics} has no {key} records")
    before = next((r[key] for r in evals if r["step"] == 0), float("nan"))
    after = max(r[key] for r in evals if r["step"] > 0)
    return before, after


def ask(url: str, model_id: str, image_path: str, question: str) -> str:
    """One OpenAI-format chat completion with the image as a data: URL; returns the answer text."""
    data = base64.b64encode(Path(image_path).read_bytes()).decode()
    payload = {
        "model": model_id,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
            {"type": "text", "text": question},
        ]}],
    }
    r = httpx.post(f"{url}/v1/chat/completions", json=payload, timeout=120)
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def run_demo(console: Console, output: str | None = None, overrides: list[str] | None = None,
             keep_serving: bool = False, port: int | None = None, stop_server: bool = True) -> DemoResult:
    """Train, serve, query; print what happened and return the measurements.

    `keep_serving` blocks until Ctrl-C; `stop_server=False` returns with the endpoint still up (tests use it).
    """
    from vray.infer.target import resolve_target
    from vray.serve.runner import block_until_interrupted, deploy, shutdown
    from vray.train.launcher import run_training
    from vray.train.prepare import prepare

    seconds: dict[str, float] = {}
    t0 = time.time()
    spec = demo_spec(output, overrides, name=f"demo-{time.strftime('%Y%m%d-%H%M%S')}")
    console.rule("[bold]vray demo")
    console.print(f"fine-tuning {spec.model.source} ({spec.arch.display} architecture) with {spec.trainingMode.type} "
                  f"on {spec.data.train}, {spec.cluster.workers} CPU workers on Ray (DDP over gloo)")
    prepared = prepare(spec)
    seconds["prepare"] = time.time() - t0
    t1 = time.time()
    run = run_training(prepared, console)
    seconds["train"] = time.time() - t1
    before, after = held_out_metric(run, "eval/exact_match")

    t2 = time.time()
    target = resolve_target(run.uri)
    from vray.serve.options import ServeOptions

    endpoint = deploy(target, ServeOptions.resolve(target, {"gpu": None}), port=port or free_port())
    seconds["serve_start"] = time.time() - t2
    sample = read_jsonl(prepared.eval_path)[0]
    question = sample.conversation[0].text
    t3 = time.time()
    answer = ask(endpoint.url, endpoint.model_id, sample.images[0], question)
    seconds["first_answer"] = time.time() - t3
    seconds["total"] = time.time() - t0

    table = Table(title="held-out exact match (synthetic:vqa eval split)")
    table.add_column("model")
    table.add_column("exact match", justify="right")
    table.add_row("untrained (step 0)", f"{before:.3f}")
    table.add_row(f"fine-tuned ({target.checkpoint})", f"{after:.3f}")
    console.print(table)
    console.print(f"POST {endpoint.url}/v1/chat/completions")
    console.print(f"  image:    {sample.images[0]}")
    console.print(f"  question: {question}")
    console.print(f"  expected: {sample.answer.text}")
    console.print(f"  [bold]answer:   {answer}[/bold]")
    console.print(f"run directory: {run.uri}  ({seconds['total']:.0f}s in all)")
    result = DemoResult(run.uri, before, after, question, sample.answer.text, answer, endpoint.url,
                        endpoint.model_id, seconds)
    if keep_serving:
        block_until_interrupted(endpoint, console)
    elif stop_server:
        shutdown(final=True)
    return result
