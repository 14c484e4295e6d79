"""Shared fixtures: an isolated vray cache, and one Ray head per session for the integration tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VRAY = str(Path(sys.executable).with_name("vray"))


@pytest.fixture(scope="session", autouse=True)
def vray_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny checkpoints and synthetic datasets go to one folder per test session (or $VRAY_TEST_CACHE)."""
    cache = Path(os.environ.get("VRAY_TEST_CACHE") or tmp_path_factory.mktemp("vray-cache"))
    os.environ["VRAY_CACHE"] = str(cache)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return cache


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory):
    """A `ray start --head` on 127.0.0.1 for the session; RAY_ADDRESS points every driver (and CLI) at it."""
    import ray

    ray_exe = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    port = _free_port()
    temp_dir = tmp_path_factory.mktemp("ray")
    # A loopback-only test cluster: no token, so the head, in-process drivers and CLI subprocesses agree.
    os.environ["RAY_AUTH_MODE"] = "disabled"
    # Four logical CPUs on a 2-core machine: two training workers and a Serve replica can coexist.
    subprocess.run(
        [ray_exe, "start", "--head", f"--port={port}", "--num-cpus=4", "--node-ip-address=127.0.0.1",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        check=True, capture_output=True, text=True,
    )
    address = f"127.0.0.1:{port}"
    os.environ["RAY_ADDRESS"] = address
    try:
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        os.environ.pop("RAY_ADDRESS", None)
        subprocess.run([ray_exe, "stop", "--force"], capture_output=True)


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the installed `vray` command."""
    return subprocess.run([VRAY, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=REPO)
