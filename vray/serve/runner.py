"""`vray serve`: deploy a target on Ray Serve over HTTP, wait until it answers, block or detach."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import httpx
from rich.console import Console

from vray.cluster import ensure_ray, owns_cluster, running_cluster_address, start_persistent_head
from vray.errors import VrayError
from vray.infer.target import ServeTarget
from vray.serve.config import APP_NAME
from vray.serve.options import ServeOptions

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Endpoint:
    """Where a deployed model answers."""

    url: str
    model_id: str


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an IPv4 / IPv6 address, brackets or not) only answers this machine."""
    import ipaddress

    bare = host.strip("[]")
    if bare in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, api_key: str | None, insecure: bool) -> None:
    """A non-loopback address needs an API key (or an explicit --insecure)."""
    if not is_loopback(host) and not api_key and not insecure:
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


def check_resources(options: ServeOptions) -> None:
    """Refuse a deployment whose replicas ask for GPUs the cluster does not have (Serve would wait forever)."""
    import ray

    need = options.replica.num_gpus
    have = ray.cluster_resources().get("GPU", 0)
    if need and have < need:
        raise VrayError(
            f"a replica needs {need} GPU(s) ({options.replica.gpu}) but this Ray cluster has {have:g}; serve on CPU with "
            "--gpu none, or join a cluster with GPUs (RAY_ADDRESS)"
        )


def _serve(verbose: bool = False) -> Any:
    """Ray Serve, with its driver-side INFO lines (started, deployed, deleting) kept out of the terminal: importing
    Serve sets its logger to INFO, so the level is set after the import."""
    from ray import serve

    logging.getLogger("ray.serve").setLevel(logging.INFO if verbose else logging.WARNING)
    return serve


def deploy(target: ServeTarget, options: ServeOptions, host: str = "127.0.0.1", port: int = 8000,
           detach: bool = False, insecure: bool = False, verbose: bool = False) -> Endpoint:
    """Deploy on Ray Serve and return once /healthz answers. A detached server lives in a persistent cluster."""
    serve = _serve(verbose)

    check_exposure(host, options.api_key, insecure)
    if detach and running_cluster_address() is None:
        start_persistent_head()
    ensure_ray(verbose)
    check_resources(options)
    from vray.serve.app import build_app

    serve.start(http_options={"host": host, "port": port})
    _check_http_options(host, port)
    serve.run(build_app(target, options), name=APP_NAME, route_prefix="/", blocking=False)
    url = _url(host, port)
    wait_until_healthy(url)
    return Endpoint(url=url, model_id=target.model_id)


def _url(host: str, port: int) -> str:
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host.strip("[]"))
    return f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"  # IPv6 addresses in brackets


def deploy_config(config: dict[str, Any], detach: bool = False, insecure: bool = False, verbose: bool = False,
                  timeout_s: float = 600) -> list[str]:
    """Deploy a Serve config file's applications (as `serve run` does: the config is the whole desired state)
    and return their URLs once every one is RUNNING."""
    serve = _serve(verbose)
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    from vray.cluster import forwarded_env

    http = config.get("http_options") or {}
    host, port = http.get("host", "127.0.0.1"), int(http.get("port", 8000))
    for app in config["applications"]:
        if app.get("import_path", "").startswith("vray."):
            key_env = (app.get("args") or {}).get("api_key_env") or "VRAY_API_KEY"
            check_exposure(host, os.environ.get(key_env), insecure)
        # The builder and replicas read keys and storage credentials from their environment: carry this
        # shell's (in memory only; the file on disk keeps no secrets).
        env = app.setdefault("runtime_env", {}).setdefault("env_vars", {})
        for k, v in forwarded_env().items():
            env.setdefault(k, v)
    if detach and running_cluster_address() is None:
        start_persistent_head()
    ensure_ray(verbose)
    schema = ServeDeploySchema.model_validate(config)
    client = serve_start(http_options={"host": host, "port": port}, proxy_location=schema.proxy_location)
    _check_http_options(host, port)
    client.deploy_apps(schema, _blocking=False)
    names = [a.name for a in schema.applications]
    deadline = time.time() + timeout_s
    while True:
        apps = serve.status().applications
        states = {n: apps[n] for n in names if n in apps}
        failed = {n: s for n, s in states.items() if str(s.status).endswith(("DEPLOY_FAILED", "UNHEALTHY"))}
        if failed:
            name, state = next(iter(failed.items()))
            raise VrayError(f"application {name!r} failed to deploy:\n{state.message}")
        if len(states) == len(names) and all(str(s.status).endswith("RUNNING") for s in states.values()):
            break
        if time.time() > deadline:
            raise VrayError(f"the applications did not start within {timeout_s:.0f}s: "
                            + ", ".join(f"{n}: {s.status}" for n, s in states.items()))
        time.sleep(1)
    return [_url(host, port) + (a.route_prefix or "/").rstrip("/") for a in schema.applications]


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


def block_until_interrupted(what: str, console: Console, names: tuple[str, ...] = (APP_NAME,)) -> None:
    """Keep serving until Ctrl-C, then take the applications down."""
    console.print(f"serving {what} (Ctrl-C to stop)")
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        console.print("stopping...")
    finally:
        shutdown(names, final=True)


def shutdown(names: tuple[str, ...] = (APP_NAME,), final: bool = False) -> None:
    """Remove the applications; stop Serve itself (proxies included) when no other application remains.

    With `final` (this process is done with Ray), Serve is not shut down on its own: its controller's shutdown
    makes the raylet print a task-retry error. A local cluster this process started is stopped whole instead, as it
    would be at exit; a cluster it joined keeps its Serve instance (with no applications of this process) for
    whoever serves there next."""
    import ray

    serve = _serve()
    try:
        for name in names:
            serve.delete(name)
        if final:
            if owns_cluster():
                ray.shutdown()
        elif not serve.status().applications:
            serve.shutdown()
    except Exception:  # noqa: BLE001 - nothing deployed, or Serve already gone
        pass
