"""Evaluation under sharded engines: the whole model gathered once per evaluation against every layer gathered in
every forward of every generated token (`synced_gpus`), on 2 gloo ranks without Ray.

For zero3 and fsdp2 it trains a tiny checkpoint for 2 steps with evaluation before and after, once on each path,
and records per evaluation its wall time, the whole-model gathers, and the collectives the ranks ran (all-gathers,
reduce-scatters, all-reduces and broadcasts, counted on rank 0). Over TCP between nodes each collective costs
milliseconds, so the count is what the layer-by-layer path costs at scale.

    python benchmarks/eval_generation.py [--eval 8] [--new-tokens 16]

Results go to benchmarks/results/eval_generation-<date>.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch
from results_io import write_result

from vray.spec import validate_spec
from vray.train.local import run_workers
from vray.train.prepare import prepare, worker_config, write_run_files

COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "_all_gather_base",
               "all_gather_coalesced", "reduce_scatter_tensor", "_reduce_scatter_base", "all_reduce", "broadcast")
_COUNTS = {"n": 0}


def _count_collectives() -> None:
    """Count calls of torch.distributed's collectives, wherever they are looked up (once per process)."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    if getattr(dist, "_vray_counted", False):
        return
    for name in COLLECTIVES:
        original = getattr(distributed_c10d, name, None) or getattr(dist, name, None)
        if original is None:
            continue

        def counted(*args, _original=original, **kwargs):
            _COUNTS["n"] += 1
            return _original(*args, **kwargs)

        for module in (dist, distributed_c10d):
            if hasattr(module, name):
                setattr(module, name, counted)
    dist._vray_counted = True


def entry(config):
    """One rank: count the collectives each evaluation runs; the `-synced` runs take the layer-by-layer path."""
    from vray.train import loop

    _count_collectives()
    original = getattr(loop.Recipe, "_vray_original", None)
    if original is None:  # the process group runs several runs in turn: patch once, choose per run
        original = loop.Recipe._vray_original = (loop.Recipe.validate, loop.Recipe._gather_for_eval)
    validate, gather = original

    def counted_validate(self):
        before = _COUNTS["n"]
        out = validate(self)
        out["eval_collectives"] = _COUNTS["n"] - before
        return out

    loop.Recipe.validate = counted_validate
    loop.Recipe._gather_for_eval = (lambda self: False) if config.spec.name.endswith("-synced") else gather
    return loop.train_worker(config)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval", type=int, default=8, help="held-out samples")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    records = []
    with tempfile.TemporaryDirectory(prefix="eval-generation-") as tmp:
        configs, names = [], []
        for strategy in ("zero3", "fsdp2"):
            for path in ("gathered", "synced"):
                name = f"{strategy}-{path}"
                spec = {
                    "architecture": {"name": "qwen2.5vl", "size": "3B"}, "model": {"source": "tiny:qwen2_5_vl"},
                    "compute": {"precisionType": "BFloat16"}, "task": "vqa",
                    "data": {"train": f"synthetic:vqa?train=4&eval={args.eval}"},
                    "hyperparameters": {"epochs": 1, "learningRate": 1e-3, "batchSize": 2}, "lora": {"dropout": 0.0},
                    "evaluation": {"maxNewTokens": args.new_tokens, "temperature": 0, "repetitionPenalty": 1.0},
                    "cluster": {"workers": 2, "strategy": strategy}, "output": f"{tmp}/runs", "name": name,
                }
                prepared = prepare(validate_spec(spec))
                write_run_files(prepared)
                configs.append(worker_config(prepared, rows_in=f"{tmp}/rows/{name}"))
                names.append((name, prepared.run))
        outcomes = run_workers(configs, 2, keep_going=True, entry=entry)
        for (name, run), outcome in zip(names, outcomes):
            record = {"run": name, "ok": outcome.ok}
            if outcome.ok:
                evals = [r for r in run.read_metrics() if "eval/loss" in r]
                record["evaluations"] = [{k: r[k] for k in ("step", "eval/samples", "eval/loss", "eval_seconds",
                                                            "eval_gathers", "eval_synced", "eval_collectives")}
                                         for r in evals]
            else:
                record["error"] = outcome.report()[-2000:]
            records.append(record)
            print(record, flush=True)
    result = {
        "benchmark": "eval_generation", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu, 2 gloo ranks", "torch": torch.__version__, "eval_samples": args.eval,
        "max_new_tokens": args.new_tokens, "model": "tiny:qwen2_5_vl LoRA",
        "note": ("eval_collectives: calls of torch.distributed's collective functions on rank 0 during one evaluation "
                 "(a lower bound: a backend's coalesced launches below that layer are not seen); eval_gathers: "
                 "whole-model gathers. The step-0 evaluation includes first-use costs (DeepSpeed's trace, kernel set-up)."),
        "records": records,
    }
    write_result(args.out, "eval_generation", result)
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
