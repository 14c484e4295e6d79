"""Time `vray demo` end to end and per stage; write JSON to benchmarks/results/.

Target: the whole demo (Ray start, LoRA fine-tune on 2 CPU workers, Serve deploy, first HTTP answer) in
under 5 minutes on a 2-core CPU machine.

    python benchmarks/demo_e2e.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from results_io import write_result

TARGET_SECONDS = 300


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    from rich.console import Console

    from vray.demo import run_demo

    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("VRAY_CACHE", str(Path(tmp) / "cache"))  # cold cache: tiny checkpoint + data written
        result = run_demo(Console(stderr=True), output=str(Path(tmp) / "runs"))
    wall = time.time() - started
    record = {
        "benchmark": "demo_e2e",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "device": "cpu"},
        "seconds": {**{k: round(v, 1) for k, v in result.seconds.items()}, "wall_including_imports": round(wall, 1)},
        "exact_match_before": result.exact_match_before,
        "exact_match_after": result.exact_match_after,
        "answer": result.answer,
        "expected": result.expected,
        "target_seconds": TARGET_SECONDS,
        "meets_target": wall < TARGET_SECONDS,
    }
    write_result(args.out, "demo_e2e", record, echo=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
