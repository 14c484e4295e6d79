"""Where benchmark scripts put what they measured: benchmarks/results/<name>[-<tag>]-<local time>.json."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def result_path(out: str | Path, name: str, tag: str | None = None, suffix: str = ".json") -> Path:
    """A new file name in `out` (created), stamped with the local time; `tag` (a device name) is slugged."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    slug = f"-{''.join(c if c.isalnum() else '-' for c in tag)[:40]}" if tag else ""
    return folder / f"{name}{slug}-{datetime.now().strftime('%Y%m%d-%H%M%S')}{suffix}"


def write_result(out: str | Path, name: str, result: dict[str, Any], tag: str | None = None, echo: bool = False) -> Path:
    """Write `result` as indented JSON, print its path (and the JSON with `echo`), and return the path."""
    path = result_path(out, name, tag)
    path.write_text(json.dumps(result, indent=2) + "\n")
    if echo:
        print(json.dumps(result, indent=2))
    print(path)
    return path
