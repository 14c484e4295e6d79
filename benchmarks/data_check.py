"""The data check at scale: `vray data check` / the check `vray train` runs before planning, on a 100k-row dataset.

    python benchmarks/data_check.py [--rows 100000] [--images 1000] [--side 224] [--out benchmarks/results]

The dataset is JSONL rows over `--images` distinct JPEG files (each row decodes its image and is encoded by the
Qwen2.5-VL processor of the tiny checkpoint at the family's resolution limits); one row in 50 names a missing
image and one in 100 is broken JSON. Measured: reading and hashing the file, the check in this process (on a
slice, as rows/s), the check as Ray tasks on a local Ray of this machine's CPUs (every row), and the second check
of the same file, which reads its report from the cache.
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
import torch
from PIL import Image
from results_io import write_result

from vray.archs import registry
from vray.data.check import check_dataset
from vray.data.io import read_samples
from vray.models.loader import load_processor
from vray.models.tiny import tiny_checkpoint


def write_dataset(folder: Path, rows: int, images: int, side: int) -> Path:
    rng = np.random.default_rng(0)
    for k in range(images):
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(folder / f"{k}.jpg", quality=90)
    path = folder / "data.jsonl"
    with open(path, "w") as fh:
        for i in range(rows):
            if i % 100 == 99:
                fh.write("{broken json\n")
                continue
            image = "missing.jpg" if i % 50 == 7 else f"{i % images}.jpg"
            fh.write(json.dumps({"id": str(i), "task": "vqa", "images": [image], "conversation": [
                {"role": "user", "text": "<image>What is in the picture?"},
                {"role": "assistant", "text": f"noise number {i}"}]}) + "\n")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--side", type=int, default=224)
    parser.add_argument("--serial-rows", type=int, default=2000, help="rows checked in this process, for rows/s")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["VRAY_CACHE"] = str(Path(tmp) / "cache")
        folder = Path(tmp) / "data"
        folder.mkdir()
        data = write_dataset(folder, args.rows, args.images, args.side)
        arch = registry.get("qwen2.5vl", "3B")
        processor = load_processor(tiny_checkpoint("qwen2_5_vl"))
        ip = processor.image_processor
        factor = ip.patch_size * ip.merge_size
        ip.size = {"shortest_edge": 4 * factor * factor, "longest_edge": 16384 * factor * factor}  # the real limits
        settings = {"max_tokens": 4096}

        t0 = time.perf_counter()
        parsed = read_samples(str(data))
        read_s = time.perf_counter() - t0

        lines = data.read_text().splitlines(keepends=True)
        head, warm = Path(tmp) / "head.jsonl", Path(tmp) / "warm.jsonl"
        head.write_text("".join(lines[:args.serial_rows]))
        warm.write_text("".join(lines[:20]))
        for name in os.listdir(folder):
            if name.endswith(".jpg"):
                os.symlink(folder / name, Path(tmp) / name)
        check_dataset(str(warm), arch, processor, cache=False, **settings)  # imports, first encode
        t0 = time.perf_counter()
        serial = check_dataset(str(head), arch, processor, cache=False, **settings)
        serial_s = time.perf_counter() - t0

        cpus = os.cpu_count() or 1
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        marks: list[tuple[float, int]] = []
        t0 = time.perf_counter()
        report = check_dataset(str(data), arch, processor, parsed=parsed, use_ray=True, cache=True,
                               progress=lambda done, total: marks.append((time.perf_counter() - t0, done)), **settings)
        ray_s = time.perf_counter() - t0
        ray.shutdown()

        t0 = time.perf_counter()
        again = check_dataset(str(data), arch, processor, **settings)  # reads and hashes the file, then the cache
        cached_s = time.perf_counter() - t0
        assert again.cached and again.issues == report.issues and not report.cached
        summary = report.summary()
    first_progress = next((t for t, done in marks if done > 0), None)
    result = {
        "benchmark": "data_check", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": "cpu"},
        "dataset": {"rows": args.rows, "distinct_images": args.images, "image": f"{args.side}x{args.side} JPEG",
                    "valid_rows": summary["valid_rows"], "errors": summary["errors"], "by_kind": summary["by_kind"],
                    "processor": "Qwen2.5-VL (tiny checkpoint), real resolution limits"},
        "read_and_hash_s": round(read_s, 2),
        "in_process": {"rows": serial.rows, "seconds": round(serial_s, 2),
                       "rows_per_s": round(serial.rows / serial_s, 1), "torch_threads": torch.get_num_threads()},
        "ray_tasks": {"cpus": os.cpu_count(), "rows": report.rows, "seconds": round(ray_s, 1),
                      "rows_per_s": round(report.rows / ray_s, 1), "first_progress_s": round(first_progress or 0, 1),
                      "progress_updates": len(marks)},
        "second_check_from_cache_s": round(cached_s, 2),
    }
    write_result(args.out, "data_check", result, echo=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
