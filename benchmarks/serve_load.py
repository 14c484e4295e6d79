"""Bounded load on a local Serve deployment: requests/s and p50 / p95 / p99 latency at concurrency 1, 4 and 16,
with `@serve.batch` dynamic batching on (up to 16 requests per generate call) and off (one at a time).

Target: batching at least doubles throughput at concurrency 16 on CPU with a tiny model. Every request goes to
127.0.0.1; each level sends a fixed number of requests, so the run ends by itself.

    python benchmarks/serve_load.py [--requests-per-level 48] [--max-tokens 8]

Writes benchmarks/results/serve_load-<time>.json and .png.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import httpx
from PIL import Image
from results_io import RESULTS, write_result

LEVELS = (1, 4, 16)


def _body(max_tokens: int, i: int) -> dict:
    buf = io.BytesIO()
    Image.new("RGB", (112, 112), ((i * 37) % 256, 90, 160)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "What colour is the square?"}]}],
            "max_tokens": max_tokens, "temperature": 0}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def load_level(url: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    """Send `requests` requests with `concurrency` in flight; throughput and latency percentiles."""
    latencies: list[float] = []
    failures = 0

    def one(i: int) -> None:
        nonlocal failures
        start = time.perf_counter()
        r = httpx.post(url + "/v1/chat/completions", json=_body(max_tokens, i), timeout=300)
        if r.status_code == 200:
            latencies.append(time.perf_counter() - start)
        else:
            failures += 1

    with ThreadPoolExecutor(concurrency) as pool:  # warm-up: one round at this concurrency
        list(pool.map(one, range(concurrency)))
    latencies.clear()
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    return {"concurrency": concurrency, "requests": requests, "failures": failures, "wall_s": round(wall, 2),
            "requests_per_s": round(len(latencies) / wall, 3),
            "p50_s": round(percentile(latencies, 0.5), 3), "p95_s": round(percentile(latencies, 0.95), 3),
            "p99_s": round(percentile(latencies, 0.99), 3), "mean_s": round(statistics.fmean(latencies), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests-per-level", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--family", default="qwen2_5_vl")
    args = parser.parse_args()


    from vray.cluster import connect, free_port
    from vray.infer.target import resolve_target
    from vray.serve.options import ServeOptions
    from vray.serve.runner import deploy, shutdown
    from vray.testing.runs import write_adapter_run

    connect(None, num_cpus=4, include_dashboard=False, log_to_driver=False)  # Ray's default: token auth on
    run = write_adapter_run(tempfile.mkdtemp(prefix="vray-serve-load-"), "load", family=args.family)
    target = resolve_target(run.uri)
    modes = {}
    for mode, batch in (("batched", 16), ("unbatched", 1)):
        options = ServeOptions.resolve(target, {"maxBatchSize": batch, "batchWaitTimeoutS": 0.05, "minReplicas": 1,
                                                "maxReplicas": 1, "replicaCpus": 1})
        endpoint = deploy(target, options, port=free_port())
        modes[mode] = [load_level(endpoint.url, c, args.requests_per_level, args.max_tokens) for c in LEVELS]
        for row in modes[mode]:
            print(mode, row, flush=True)
        shutdown()
        from ray import serve

        serve.shutdown()
    speedup = {c: round(b["requests_per_s"] / u["requests_per_s"], 2)
               for c, b, u in zip(LEVELS, modes["batched"], modes["unbatched"])}
    result = {
        "benchmark": "serve_load", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "model": f"tiny:{args.family} + random LoRA", "max_tokens": args.max_tokens,
        "requests_per_level": args.requests_per_level, "replicas": 1, "max_batch_size": 16,
        "results": modes, "batching_speedup": speedup,
        "target": "batched >= 2x unbatched requests/s at concurrency 16", "meets_target": speedup[16] >= 2.0,
    }
    print(json.dumps({"batching_speedup": speedup, "meets_target": result["meets_target"]}))
    out = write_result(RESULTS, "serve_load", result)
    _plot(modes, out.with_suffix(".png"))


def _plot(modes: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, rows in modes.items():
        a.plot(LEVELS, [r["requests_per_s"] for r in rows], marker="o", label=mode)
        b.plot(LEVELS, [r["p95_s"] for r in rows], marker="o", label=f"{mode} p95")
        b.plot(LEVELS, [r["p50_s"] for r in rows], marker=".", linestyle="--", label=f"{mode} p50")
    a.set(xlabel="concurrency", ylabel="requests/s", title="throughput", xscale="log", xticks=LEVELS)
    b.set(xlabel="concurrency", ylabel="seconds", title="latency", xscale="log", xticks=LEVELS)
    a.set_xticklabels(LEVELS)
    b.set_xticklabels(LEVELS)
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
