"""vray's local cache: generated datasets, tiny checkpoints and fetched remote checkpoints."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Where vray caches generated datasets, tiny checkpoints and fetched checkpoints ($VRAY_CACHE, else
    ~/.cache/vray)."""
    return Path(os.environ.get("VRAY_CACHE") or Path("~/.cache/vray").expanduser())
