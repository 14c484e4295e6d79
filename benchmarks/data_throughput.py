"""Data throughput: samples/s per core to decode and process images with the Qwen2.5-VL and Qwen3-VL processors,
and the share of step time a CPU training run on Ray spends waiting for data (target: under 5%), with the
preprocessing in the workers' threads (the default on CPU workers) and in Ray Data actors (the default on GPUs;
on a 2-core machine the actors compete with the training workers for the same cores).

    python benchmarks/data_throughput.py [--samples 32] [--out benchmarks/results]

The processors are the families' own (from the tiny checkpoints) at their real resolution limits; images are
JPEG files on disk, so decoding is measured too. One thread = one core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image
from results_io import write_result

from vray.archs import registry
from vray.data.collate import Collator
from vray.data.sample import Sample
from vray.models.loader import load_processor
from vray.models.tiny import REFERENCE, tiny_checkpoint


def processor_throughput(family: str, side: int, count: int, folder: Path) -> dict:
    processor = load_processor(tiny_checkpoint(family))
    ip = processor.image_processor
    factor = ip.patch_size * ip.merge_size
    ip.size = {"shortest_edge": 4 * factor * factor, "longest_edge": 16384 * factor * factor}  # the real limits
    collator = Collator(processor, registry.get(*REFERENCE[family]), "You are a benchmark.")
    rng = np.random.default_rng(0)
    samples = []
    for i in range(count):
        path = folder / f"{family}-{side}-{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(path, quality=90)
        samples.append(Sample.model_validate({"id": str(i), "task": "vqa", "images": [str(path)], "conversation": [
            {"role": "user", "text": "What colour is the square?"}, {"role": "assistant", "text": "red"}]}))
    collator.encode(samples[0])  # warm-up
    started = time.perf_counter()
    visual = 0
    for s in samples:
        visual = collator.encode(s).visual_tokens
    elapsed = time.perf_counter() - started
    return {"family": family, "image": f"{side}x{side}", "samples": count, "visual_tokens": visual,
            "samples_per_s_per_core": round(count / elapsed, 2)}


def training_wait_share(output: str, preprocessors: int) -> dict:
    """The demo's CPU training run (2 workers on Ray) with preprocessing in worker threads (0) or Ray Data actors."""
    from rich.console import Console

    from vray.demo import demo_spec
    from vray.train.launcher import run_training
    from vray.train.prepare import prepare

    spec = demo_spec(output, ["hyperparameters.epochs=3", f"data.preprocessors={preprocessors}"],
                     name=f"data-throughput-{preprocessors}")
    run = run_training(prepare(spec), Console(stderr=True))
    steps = [r for r in run.read_metrics() if "loss" in r]
    steady = steps[1:]  # the first step also waits for the preprocessing actors to start
    span = steady[-1]["time"] - steps[0]["time"]
    waited = sum(r["data_wait_s"] for r in steady)
    return {"preprocessing": "worker threads" if preprocessors == 0 else f"{preprocessors} Ray Data actor(s) per worker",
            "steps": len(steps), "first_step_wait_s": round(steps[0]["data_wait_s"], 2),
            "steady_wait_share": round(waited / span, 4), "steady_samples_per_s": round(len(steady) * 8 / span, 1),
            "target": "under 5% of step time"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("VRAY_CACHE", str(Path(tmp) / "cache"))
        rows = [processor_throughput(f, side, args.samples, Path(tmp)) for f in ("qwen2_5_vl", "qwen3_vl")
                for side in (448, 1344)]
        for r in rows:
            print(json.dumps(r), flush=True)
        wait = [training_wait_share(str(Path(tmp) / "runs"), n) for n in (0, 1)]
    result = {"benchmark": "data_throughput", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": "cpu"},
              "processing": rows, "training_data_wait": wait}
    write_result(args.out, "data_throughput", result, echo=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
