"""Shared fixtures: an isolated vray cache, one Ray head per session for the integration tests, and one head with
its dashboard (the job API) for the tests of submitted jobs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from vray.cluster import free_port

REPO = Path(__file__).resolve().parents[1]
VRAY = str(Path(sys.executable).with_name("vray"))


@pytest.fixture(scope="session", autouse=True)
def vray_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny checkpoints and synthetic datasets go to one folder per test session (or $VRAY_TEST_CACHE)."""
    cache = Path(os.environ.get("VRAY_TEST_CACHE") or tmp_path_factory.mktemp("vray-cache"))
    os.environ["VRAY_CACHE"] = str(cache)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return cache


@pytest.fixture(scope="session", autouse=True)
def ray_token(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Ray token for the session, found where Ray looks (RAY_AUTH_TOKEN_PATH), and RAY_AUTH_MODE left unset: every
    head a test starts with `ray start --head` then turns token authentication on, as it does for a user with a token
    in ~/.ray/auth_token, and every local ray.init() uses it instead of writing one into this machine's HOME."""
    import uuid

    token = tmp_path_factory.mktemp("ray-token") / "auth_token"
    token.write_text(uuid.uuid4().hex)
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    os.environ.pop("RAY_AUTH_MODE", None)
    return token


@pytest.fixture(autouse=True)
def _ray_auth_mode_restored():
    """A local ray.init() sets RAY_AUTH_MODE=token in os.environ for the rest of the process; each test starts from
    the environment the one before it had, so no test depends on another having run first."""
    before = os.environ.get("RAY_AUTH_MODE")
    yield
    if before is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = before


def agent_ports() -> list[str]:
    """`ray start` flags giving a head's node agents ports of their own: the dashboard agent's default (52365) is
    one port per machine, and the session head and a test's own head run side by side."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory, ray_token: Path):
    """A `ray start --head` on 127.0.0.1 for the session; RAY_ADDRESS points every driver (and CLI) at it."""
    import ray

    ray_exe = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    temp_dir = tmp_path_factory.mktemp("ray")
    # Nothing exported but the session's token (`ray_token`): the head turns token authentication on by itself.
    # Four logical CPUs on a 2-core machine: two training workers and a Serve replica can coexist.
    ports: dict[str, int] = {}

    def command() -> list[str]:
        ports.update(port=free_port(), metrics=free_port())
        return [ray_exe, "start", "--head", f"--port={ports['port']}", "--num-cpus=4", "--node-ip-address=127.0.0.1",
                "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}",
                f"--metrics-export-port={ports['metrics']}", *agent_ports()]

    ray_start(command, temp_dir)
    port, metrics_port = ports["port"], ports["metrics"]
    address = f"127.0.0.1:{port}"
    os.environ["RAY_ADDRESS"] = address
    os.environ["VRAY_TEST_METRICS_PORT"] = str(metrics_port)  # Prometheus text of this node's Ray metrics
    try:
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        os.environ.pop("RAY_ADDRESS", None)
        stop_cluster(temp_dir)


def ray_start(command: Callable[[], list[str]], temp_dir: Path, env: dict[str, str] | None = None,
              attempts: int = 2) -> subprocess.CompletedProcess:
    """Run `ray start` (`command()` gives its arguments, with fresh ports each time). A head whose dashboard misses
    Ray's startup window on a busy 2-core machine (its modules are nine Python processes) is stopped and started
    again once; a head that still fails says why: its output and the last lines of the logs its sessions left under
    `temp_dir` (a bare exit status tells nothing on a CI machine that is gone afterwards)."""
    # Ray gives a dashboard 60 s to come up; a suite already running training workers can take longer.
    env = {**(os.environ if env is None else env), "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "180"}
    for _ in range(attempts):
        args = command()
        started = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
        if started.returncode == 0:
            return started
        stop_cluster(temp_dir)
    logs = []
    for log in sorted(Path(temp_dir).glob("session_2*/logs/*")):
        if log.is_file() and log.suffix in (".out", ".err", ".log") and log.stat().st_size:
            logs.append(f"--- {log}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
    pytest.fail(f"{' '.join(args)} exited {started.returncode} ({attempts} attempts)\n--- stdout\n"
                f"{started.stdout[-3000:]}\n--- stderr\n{started.stderr[-3000:]}\n" + "\n".join(logs)[-12000:],
                pytrace=False)


def stop_cluster(temp_dir: Path) -> None:
    """Stop the Ray cluster whose session lives under `temp_dir` and nothing else (`ray stop` would stop every
    cluster on the machine): its processes carry the folder on their command line, but for the head's Ray client
    server, which names the head's GCS port instead; workers exit with their raylet."""
    import psutil

    mine, clients = [], []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            args = proc.info["cmdline"] or ()
            if any(str(temp_dir) in arg for arg in args):
                mine.append(proc)
            elif "ray.util.client.server" in args:
                clients.append((proc, args))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    gcs_ports = {arg.split("=", 1)[1] for proc in mine for arg in (proc.info["cmdline"] or ())
                 if arg.startswith("--gcs_server_port=")}
    mine += [proc for proc, args in clients
             if any(a.startswith("--address=") and a.rsplit(":", 1)[-1] in gcs_ports for a in args)]
    for proc in mine:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(mine, timeout=10)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def user_env(home: Path, **extra: str) -> dict[str, str]:
    """A shell of a user whose HOME is `home`, with nothing about Ray exported: no RAY_AUTH_MODE, no token variable, no
    address (the session's own token and head are this test process's, not the user's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH_", "RAY_ADDRESS"))}
    return {**env, "HOME": str(home), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **extra}


def start_user_head(temp_dir: Path, env: dict[str, str]) -> dict[str, str]:
    """`ray start --head` with its dashboard (the job API) on 127.0.0.1 in the user's shell `env`; the head decides
    about authentication by itself (on when the user has a token)."""
    ray_exe = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    ports: dict[str, int] = {}

    def command() -> list[str]:
        ports.update(port=free_port(), dashboard=free_port())
        return [ray_exe, "start", "--head", f"--port={ports['port']}", "--num-cpus=4", "--node-ip-address=127.0.0.1",
                "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}",
                "--disable-usage-stats", f"--temp-dir={temp_dir}", *agent_ports()]

    started = ray_start(command, temp_dir, env=env)
    port, dashboard = ports["port"], ports["dashboard"]
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    import httpx

    while time.time() < deadline:
        try:
            if httpx.get(f"{address}/api/version", timeout=2).status_code in (200, 401):
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    return {"address": address, "gcs": f"127.0.0.1:{port}", "started": started.stdout + started.stderr}


@pytest.fixture(scope="session")
def dashboard_head(tmp_path_factory, vray_cache):
    """A head started by a user who ran `vray demo` before: the demo's local cluster left a token in
    ~/.ray/auth_token, so a plain `ray start --head` turns token authentication on."""
    ray_exe = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    home = tmp_path_factory.mktemp("user-home")
    env = user_env(home)
    subprocess.run([ray_exe, "get-auth-token", "--generate"], check=True, capture_output=True, env=env)  # what ray.init() leaves
    assert (home / ".ray" / "auth_token").is_file()
    temp_dir = tmp_path_factory.mktemp("ray-jobs")
    runs = tmp_path_factory.mktemp("job-runs")
    head = start_user_head(temp_dir, env)
    assert "Token authentication is enabled" in head["started"]
    try:
        yield {**head, "runs": runs, "env": env}
    finally:
        stop_cluster(temp_dir)


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the installed `vray` command."""
    return subprocess.run([VRAY, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=REPO)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1; AWS_* variables point s3fs / pyarrow / boto3 at it, bucket `vray-test`."""
    import time
    import urllib.request

    port = free_port()
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.2)
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                            "AWS_ENDPOINT_URL", "AWS_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint)
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="vray-test")
    try:
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def shutdown_serve() -> None:
    """Stop Ray Serve on the test cluster (`RAY_ADDRESS`), reconnecting when this process has left it."""
    import ray
    from ray import serve

    from vray.cluster import connect

    if not ray.is_initialized():
        connect(os.environ["RAY_ADDRESS"])
    serve.shutdown()
