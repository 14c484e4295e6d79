"""`vray serve`: deploy a target on Ray Serve over HTTP, wait until it answers, block or detach."""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx
from rich.console import Console

from vray.errors import VrayError
from vray.ray_session import ensure_ray, running_cluster_address, start_persistent_head
from vray.serve.target import ServeTarget

LOOPBACK = ("127.0.0.1", "localhost", "::1")
APP_NAME = "vray"


@dataclass(frozen=True)
class Endpoint:
    """Where a deployed model answers."""

    url: str
    model_id: str


def check_exposure(host: str, api_key: str | None, insecure: bool) -> None:
    """A non-loopback address needs an API key (or an explicit --insecure)."""
    if host not in LOOPBACK and not api_key and not insecure:
        raise VrayError(
            f"--host {host} exposes the model beyond this machine; give --api-key KEY (clients send "
            "'Authorization: Bearer KEY'), or --insecure to serve without one"
        )


def wait_until_healthy(url: str, timeout_s: float = 300) -> None:
    """Poll GET /healthz until it answers 200; a VrayError after `timeout_s`."""
    deadline = time.time() + timeout_s
    last = ""
    while time.time() < deadline:
        try:
            r = httpx.get(f"{url}/healthz", timeout=5)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.5)
    raise VrayError(f"the server at {url} did not become healthy within {timeout_s:.0f}s (last: {last})")


def deploy(target: ServeTarget, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
           detach: bool = False, insecure: bool = False, allowed_image_hosts: list[str] | None = None,
           replica_cpus: float = 1, verbose: bool = False) -> Endpoint:
    """Deploy on Ray Serve and return once /healthz answers. A detached server lives in a persistent cluster."""
    from ray import serve

    check_exposure(host, api_key, insecure)
    if detach and running_cluster_address() is None:
        start_persistent_head()
    ensure_ray(verbose)
    from vray.serve.app import build_app

    serve.start(http_options={"host": host, "port": port})
    _check_http_options(host, port)
    app = build_app(target, api_key=api_key, allowed_image_hosts=allowed_image_hosts, replica_cpus=replica_cpus)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown_host}:{port}"
    wait_until_healthy(url)
    return Endpoint(url=url, model_id=target.model_id)


def _check_http_options(host: str, port: int) -> None:
    """Serve keeps the HTTP options it started with: refuse to silently listen elsewhere than asked."""
    try:
        from ray.serve.context import _get_global_client

        running = _get_global_client().http_config
    except Exception:  # noqa: BLE001 - an older or newer Serve without this accessor: nothing to compare
        return
    if (running.host, running.port) != (host, port):
        raise VrayError(
            f"Ray Serve already listens on {running.host}:{running.port} in this cluster; use --host {running.host} "
            f"--port {running.port}, or stop it first (`serve shutdown -y`)"
        )


def block_until_interrupted(endpoint: Endpoint, console: Console) -> None:
    """Keep serving until Ctrl-C, then take the application down."""
    console.print(f"serving {endpoint.model_id} at {endpoint.url} (Ctrl-C to stop)")
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        console.print("stopping...")
    finally:
        shutdown()


def shutdown() -> None:
    """Remove the vray application; stop Serve itself (proxies included) when no other application remains."""
    from ray import serve

    try:
        serve.delete(APP_NAME)
        if not serve.status().applications:
            serve.shutdown()
    except Exception:  # noqa: BLE001 - nothing deployed, or Serve already gone
        pass
