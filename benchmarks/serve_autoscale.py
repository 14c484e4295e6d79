"""An autoscaling trace: replica count and request latency over time under a load step up and down.

A tiny model on a local Serve deployment with autoscaling (1 to 3 replicas, short delays so the trace is short);
load goes 1 -> 8 -> 1 concurrent clients on 127.0.0.1, each phase a fixed number of seconds, then stops.

    python benchmarks/serve_autoscale.py [--low-s 20] [--high-s 60] [--after-s 60]

Writes benchmarks/results/serve_autoscale-<time>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
from results_io import RESULTS, write_result
from serve_load import _body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--low-s", type=float, default=20)
    parser.add_argument("--high-s", type=float, default=60)
    parser.add_argument("--after-s", type=float, default=60)
    parser.add_argument("--high-clients", type=int, default=8)
    args = parser.parse_args()

    from ray import serve

    from vray.cluster import connect, free_port
    from vray.infer.target import resolve_target
    from vray.serve.options import ServeOptions
    from vray.serve.runner import deploy, shutdown
    from vray.testing.runs import write_adapter_run

    connect(None, num_cpus=6, include_dashboard=False, log_to_driver=False)  # Ray's default: token auth on
    run = write_adapter_run(tempfile.mkdtemp(prefix="vray-autoscale-"), "autoscale")
    target = resolve_target(run.uri)
    serving = {"minReplicas": 1, "maxReplicas": 3, "targetOngoingRequests": 2, "upscaleDelayS": 3,
               "downscaleDelayS": 15, "maxBatchSize": 1, "replicaCpus": 1}
    endpoint = deploy(target, ServeOptions.resolve(target, serving), port=free_port())

    t0 = time.perf_counter()
    wanted = {"clients": 1}
    stop = threading.Event()
    done: list[tuple[float, float]] = []  # (finish time, latency)

    def client(idx: int) -> None:
        i = 0
        while not stop.is_set():
            if idx >= wanted["clients"]:
                time.sleep(0.1)
                continue
            start = time.perf_counter()
            r = httpx.post(endpoint.url + "/v1/chat/completions", json=_body(6, idx * 1000 + i), timeout=120)
            if r.status_code == 200:
                done.append((time.perf_counter() - t0, time.perf_counter() - start))
            i += 1

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(args.high_clients)]
    for t in threads:
        t.start()
    samples = []
    phases = [(args.low_s, 1), (args.high_s, args.high_clients), (args.after_s, 1)]
    for seconds, clients in phases:
        wanted["clients"] = clients
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            status = serve.status().applications["vray"].deployments["ModelServer"]
            samples.append({"t": round(time.perf_counter() - t0, 1), "clients": clients,
                            "replicas": status.replica_states.get("RUNNING", 0),
                            "starting": status.replica_states.get("STARTING", 0)})
            time.sleep(1)
    stop.set()
    for t in threads:
        t.join(timeout=130)
    shutdown()

    peak = max(s["replicas"] for s in samples)
    final = samples[-1]["replicas"]
    result = {
        "benchmark": "serve_autoscale", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "serving": serving, "phases": [{"seconds": s, "clients": c} for s, c in phases],
        "peak_replicas": peak, "final_replicas": final, "scaled_up": peak > 1, "scaled_down": final < peak,
        "samples": samples, "latencies": [{"t": round(t, 2), "latency_s": round(lat, 3)} for t, lat in done],
    }
    print(json.dumps({k: result[k] for k in ("peak_replicas", "final_replicas", "scaled_up", "scaled_down")}))
    out = write_result(RESULTS, "serve_autoscale", result)
    _plot(result, out.with_suffix(".png"))


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ts = [s["t"] for s in result["samples"]]
    a.step(ts, [s["replicas"] + s["starting"] for s in result["samples"]], where="post", color="tab:green",
           label="replicas asked for (running + starting)")
    a.step(ts, [s["replicas"] for s in result["samples"]], where="post", label="running replicas")
    a.step(ts, [s["clients"] for s in result["samples"]], where="post", linestyle="--", label="concurrent clients")
    a.set(ylabel="count", title="Ray Serve autoscaling under a load step (tiny model, CPU)")
    a.legend()
    b.scatter([x["t"] for x in result["latencies"]], [x["latency_s"] for x in result["latencies"]], s=6)
    b.set(xlabel="seconds", ylabel="request latency (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
