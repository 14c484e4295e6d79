"""Valid requests' latency while abusive ones hit the same replica: p50 / p95 of valid chat requests alone (clean),
then with an abusive client mix beside them (every kind of vray.testing.abuse: over-long prompts and max_tokens,
a 900 MP image header, a replaced template, invented adapters, wrong keys, a chunked body over the limit, and
streams whose client disconnects early).

Target: the p95 of valid requests under the abusive mix is within 2x of the clean run's (medians over alternating
rounds), with no 5xx. Every
request goes to 127.0.0.1 and each phase sends a fixed number of requests, so the run ends by itself.

    python benchmarks/serve_abuse.py [--valid 96] [--concurrency 4] [--abusers 2] [--max-tokens 8] [--rounds 3]
                                     [--without KIND]

Writes benchmarks/results/serve_abuse-<time>.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import httpx
from results_io import RESULTS, write_result
from serve_load import percentile

KEY = "bench-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}


def valid_phase(url: str, requests: int, concurrency: int, max_tokens: int) -> dict:
    """Send `requests` valid requests, `concurrency` at a time; their latencies and any that failed."""
    from vray.testing.abuse import messages, png

    latencies: list[float] = []
    statuses: list[int] = []

    def one(i: int) -> None:
        body = {"messages": messages(image=png(((i * 37) % 256, 90, 160))), "max_tokens": max_tokens, "temperature": 0}
        start = time.perf_counter()
        r = httpx.post(url + "/v1/chat/completions", json=body, headers=HEADERS, timeout=300)
        statuses.append(r.status_code)
        if r.status_code == 200:
            latencies.append(time.perf_counter() - start)

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    return {"requests": requests, "ok": len(latencies), "non_200": sorted(s for s in statuses if s != 200),
            "p50_s": round(percentile(latencies, 0.5), 3), "p95_s": round(percentile(latencies, 0.95), 3),
            "max_s": round(max(latencies), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--valid", type=int, default=96, help="valid requests per phase")
    parser.add_argument("--concurrency", type=int, default=4, help="valid requests in flight")
    parser.add_argument("--abusers", type=int, default=2, help="abusive clients beside them")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="clean and abused phases, alternating")
    parser.add_argument("--family", default="qwen2_5_vl")
    parser.add_argument("--without", action="append", default=[], help="leave out an abusive kind (repeatable), "
                                                                       "to see what each costs")
    args = parser.parse_args()

    import ray

    from vray.cluster import free_port
    from vray.infer.target import resolve_target
    from vray.serve.options import ServeOptions
    from vray.serve.runner import deploy, shutdown
    from vray.testing.abuse import abusive_requests
    from vray.testing.runs import write_adapter_run

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    run = write_adapter_run(tempfile.mkdtemp(prefix="vray-serve-abuse-"), "abuse", family=args.family)
    target = resolve_target(run.uri)
    options = ServeOptions.resolve(target, {"maxBatchSize": 8, "minReplicas": 1, "maxReplicas": 1, "replicaCpus": 1},
                                   api_key=KEY)
    endpoint = deploy(target, options, port=free_port())
    from ray import serve

    handle = serve.get_deployment_handle("ModelServer", app_name="vray")
    pid = handle.pid.remote().result()
    valid_phase(endpoint.url, args.concurrency, args.concurrency, args.max_tokens)  # warm-up

    kinds = abusive_requests(endpoint.url, HEADERS, target.base_id, options.max_body_bytes, options.serving.maxModelLen)
    unknown = sorted(set(args.without) - set(kinds))
    if unknown:
        raise SystemExit(f"--without {', '.join(unknown)}: the kinds are {', '.join(kinds)}")
    kinds = {kind: v for kind, v in kinds.items() if kind not in args.without}
    sent: dict[str, list[int]] = {kind: [] for kind in kinds}
    wrong: list[tuple[str, int, int]] = []
    lock = threading.Lock()

    def abused_phase() -> dict:
        stop = threading.Event()

        def abuser(offset: int) -> None:
            order = itertools.cycle(list(kinds.items())[offset:] + list(kinds.items())[:offset])
            for i, (kind, (call, status)) in enumerate(order):
                if stop.is_set():
                    return
                got = call(i)
                with lock:
                    sent[kind].append(got)
                    if got != status:
                        wrong.append((kind, status, got))

        threads = [threading.Thread(target=abuser, args=(k * 3,), daemon=True) for k in range(args.abusers)]
        for t in threads:
            t.start()
        time.sleep(1)  # the abusers are under way
        phase = valid_phase(endpoint.url, args.valid, args.concurrency, args.max_tokens)
        stop.set()
        for t in threads:
            t.join(timeout=120)
        return phase

    # Clean and abused phases alternate, so a drift in the machine's load falls on both alike.
    clean, abused = [], []
    for r in range(args.rounds):
        clean.append(valid_phase(endpoint.url, args.valid, args.concurrency, args.max_tokens))
        abused.append(abused_phase())
        print(f"round {r}: clean", clean[-1], "abused", abused[-1], flush=True)
    same_replica = handle.pid.remote().result() == pid
    healthy = httpx.get(endpoint.url + "/healthz", timeout=30).status_code == 200
    shutdown()
    p95_clean = statistics.median(p["p95_s"] for p in clean)
    p95_abused = statistics.median(p["p95_s"] for p in abused)
    ratio = round(p95_abused / p95_clean, 2)
    server_errors = sum(1 for codes in sent.values() for c in codes if c >= 500) + sum(
        1 for p in clean + abused for c in p["non_200"] if c >= 500)
    result = {
        "benchmark": "serve_abuse", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "model": f"tiny:{args.family} + random LoRA", "max_tokens": args.max_tokens, "replicas": 1,
        "max_batch_size": 8, "valid_requests": args.valid, "concurrency": args.concurrency, "abusers": args.abusers,
        "left_out": args.without,
        "rounds": args.rounds, "clean": clean, "abused": abused,
        "p95_clean_median_s": p95_clean, "p95_abused_median_s": p95_abused,
        "abusive_sent": {kind: {"count": len(codes), "statuses": sorted(set(codes))} for kind, codes in sent.items()},
        "abusive_wrong_status": wrong, "server_errors": server_errors,
        "same_replica_pid": same_replica, "healthz_ok": healthy, "p95_ratio": ratio,
        "target": "median p95 of valid requests under abuse <= 2x the clean one; no 5xx; the replica stays up",
        "meets_target": ratio <= 2.0 and server_errors == 0 and not wrong and same_replica and healthy,
    }
    print(json.dumps({k: result[k] for k in ("p95_ratio", "server_errors", "same_replica_pid", "meets_target")}))
    write_result(RESULTS, "serve_abuse", result)


if __name__ == "__main__":
    main()
