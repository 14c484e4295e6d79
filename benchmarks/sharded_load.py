"""Sharded loading on CPU: each rank's anonymous-memory high-water mark while it loads and takes its first step,
per engine, against the model's bf16 bytes and the planner's per-rank predictions.

A Qwen2.5-VL-3B-shaped checkpoint (real widths and vocabulary; --text-layers decoder layers, 2 vision blocks) is
written in Float32, then trained with LoRA at BFloat16 on 2 gloo ranks for one step under ddp, zero3 and fsdp2
(tests/train/test_sharded_load.py asserts the bounds on the same measurement).

    python benchmarks/sharded_load.py [--text-layers 8] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from results_io import write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text-layers", type=int, default=8)
    parser.add_argument("--strategies", default="ddp,zero3,fsdp2")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()

    from vray.archs import registry
    from vray.testing.memory import measure_engines
    from vray.testing.real_shaped import write_sized_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_sized_checkpoint(registry.get("qwen2.5vl", "3B"), Path(tmp) / "ckpt",
                                            text_layers=args.text_layers, vision_layers=2, dtype="float32")
        stored = json.loads((checkpoint / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
        model_bf16 = stored // 2
        measured = measure_engines(checkpoint, tuple(args.strategies.split(",")), f"{tmp}/runs")
    engines = {}
    for strategy, m in measured.items():
        plan = m["plan"]
        ranks = []
        for r in m["ranks"]:
            load, step = r["load_peak_bytes"] - r["overhead_bytes"], r["step_peak_bytes"] - r["overhead_bytes"]
            ranks.append({**r, "load_held_bytes": load, "step_held_bytes": step,
                          "load_share_of_model": round(load / model_bf16, 3),
                          "step_share_of_model": round(step / model_bf16, 3)})
        engines[strategy] = {
            "ranks": ranks, "seconds": m["seconds"],
            "predicted": {"load_peak_bytes": plan.load_peak_bytes.per_gpu, "step_peak_bytes": plan.per_gpu_bytes.total,
                          "step_breakdown": plan.per_gpu_bytes.to_dict(), "assumptions": plan.assumptions},
        }
    result = {
        "benchmark": "sharded_load", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "checkpoint": {"shape": "Qwen2.5-VL-3B widths", "text_layers": args.text_layers, "vision_blocks": 2,
                       "stored_dtype": "float32", "stored_bytes": stored, "params": stored // 4,
                       "bf16_bytes": model_bf16},
        "run": "LoRA r16, BFloat16, 2 gloo ranks, one step of one 56x56 image per rank",
        "measure": "RssAnon high-water (sampled every 5 ms) minus the fixed overhead of the same process without a model",
        "engines": engines,
    }
    write_result(args.out, "sharded_load", result, echo=True)


if __name__ == "__main__":
    main()
