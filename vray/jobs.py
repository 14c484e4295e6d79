"""`vray submit` and `vray jobs`: Ray's job submission client with what a vray run needs.

`submit(spec, address)` uploads the working directory (like `ray job submit --working-dir .`), runs `vray train
<spec>` on the cluster with the storage and hub credentials of this shell (AWS_*, HF_TOKEN, VRAY_*) in the job's
runtime_env, pip requirements only when asked (a cluster image normally has them), prints the submission id and
follows the logs until the job ends.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import time
from pathlib import Path
from typing import Any, Callable

from vray.errors import VrayError

EXCLUDES = [".git", ".venv", "venv", "**/__pycache__", "*.pt", "*.safetensors", "benchmarks/results", ".pytest_cache"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_WAIT_S = 120


def dashboard_address(address: str | None) -> str:
    """The Ray dashboard (job API) address: `--address`, RAY_API_SERVER_ADDRESS, or an http RAY_ADDRESS."""
    if address:  # what the command line says wins over the environment
        if address.startswith(("http://", "https://")):
            return address.rstrip("/")
        return f"http://{address}" if ":" in address else f"http://{address}:8265"
    for value in (os.environ.get("RAY_API_SERVER_ADDRESS"), os.environ.get("RAY_ADDRESS")):
        if value and value.startswith(("http://", "https://")):
            return value.rstrip("/")
    raise VrayError("give --address http://HEAD:8265 (the Ray dashboard of the cluster), or set RAY_API_SERVER_ADDRESS")


def client(address: str | None) -> Any:
    """A JobSubmissionClient for the cluster, with a clear error when the dashboard does not answer."""
    from ray.job_submission import JobSubmissionClient

    from vray.cluster import TOKEN_HELP, use_ray_token

    url = dashboard_address(address)
    token = use_ray_token()
    # the job SDK's INFO lines (files left out of the upload, the log stream's websocket closing) are not the user's
    # (the two SDK modules set their loggers to INFO themselves when imported, above)
    for name in ("ray.dashboard.modules.job.sdk", "ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Ray's client lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the address it is given (a shell inside a
    # cluster exports RAY_ADDRESS=<gcs>); vray has already chosen, with --address first, so hide them meanwhile.
    hidden = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        return JobSubmissionClient(url, headers=token.http_headers() if token else None)
    except Exception as exc:  # noqa: BLE001 - connection refused, wrong port, no dashboard, no token
        if _auth_refused(exc):
            source = f"the token from {token.source} was refused" if token else "it asks for a token and none was found"
            raise VrayError(f"the Ray job API at {url} refused this request: {source}; {TOKEN_HELP}") from None
        raise VrayError(f"cannot reach the Ray job API at {url} ({type(exc).__name__}: {exc}); is the head's dashboard "
                        "running (ray start --head --dashboard-host 0.0.0.0) and the port 8265 reachable?") from None
    finally:
        os.environ.update(hidden)


def _auth_refused(exc: BaseException) -> bool:
    from ray.exceptions import AuthenticationError

    return isinstance(exc, AuthenticationError) or "authentication" in str(exc).lower() or "401" in str(exc)


# paths and ports of this machine (meaningless on the cluster), whether this machine reaches the hub (the cluster
# may where a laptop does not), and the serving key (a training job has no use for it)
LOCAL_ONLY = ("VRAY_CACHE", "VRAY_TEST_METRICS_PORT", "VRAY_API_KEY", "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE",
              "HF_HUB_OFFLINE",
              "HF_XET_CACHE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "GOOGLE_APPLICATION_CREDENTIALS")


def runtime_env(working_dir: str, pip: list[str] | None = None, env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    """The job's runtime_env: the working directory, this shell's storage / hub / vray variables (plus `env_vars`),
    optional pip requirements."""
    from vray.cluster import forwarded_env

    env: dict[str, Any] = {"working_dir": working_dir, "excludes": list(EXCLUDES)}
    secret = sorted(k for k in env_vars or {} if k.startswith("RAY_AUTH_"))
    if secret:
        raise VrayError(f"--env {secret[0]}: a job's environment is stored on the cluster and shown by its dashboard, "
                        "so vray never puts the Ray token there; the cluster's own nodes already hold it")
    variables = {k: v for k, v in forwarded_env().items() if k not in LOCAL_ONLY} | dict(env_vars or {})
    if variables:
        env["env_vars"] = variables
    if pip:
        env["pip"] = list(pip)
    return env


def train_entrypoint(spec_file: str | None, working_dir: str, overrides: list[str] | None = None,
                     resume: str | None = None) -> str:
    """`vray train <spec relative to the working dir> [--set ...]`; the spec must travel with the working dir.
    With `resume` (a run directory the cluster reaches): `vray train --resume RUN_DIR [--set ...]`."""
    if resume is not None:
        parts = ["vray", "train", "--resume", resume] + [a for o in overrides or [] for a in ("--set", o)]
        return " ".join(shlex.quote(p) for p in parts)
    if spec_file is None:
        raise VrayError("give the spec file to submit (jobs/<spec>.yaml), or --resume RUN_DIR")
    spec = Path(spec_file).resolve()
    root = Path(working_dir).resolve()
    if not spec.is_file():
        raise VrayError(f"{spec_file}: no such spec file")
    try:
        rel = spec.relative_to(root)
    except ValueError:
        raise VrayError(f"{spec_file} is outside --working-dir {working_dir}; the job only sees the working directory, "
                        "so put the spec inside it (jobs/ is the usual place)") from None
    parts = ["vray", "train", rel.as_posix()] + [a for o in overrides or [] for a in ("--set", o)]
    return " ".join(shlex.quote(p) for p in parts)


def submit(spec_file: str | None, address: str | None, working_dir: str = ".", pip: list[str] | None = None,
           overrides: list[str] | None = None, submission_id: str | None = None,
           env_vars: dict[str, str] | None = None, resume: str | None = None) -> tuple[Any, str]:
    """Submit `vray train spec_file` (or `vray train --resume RUN_DIR`) to the cluster; (client, submission id)."""
    entry = train_entrypoint(spec_file, working_dir, overrides, resume)
    jobs = client(address)
    env = runtime_env(str(Path(working_dir).resolve()), pip, env_vars)
    deadline = time.time() + AGENT_WAIT_S
    while True:
        try:
            job_id = jobs.submit_job(entrypoint=entry, runtime_env=env, submission_id=submission_id,
                                     metadata={"vray.spec": Path(spec_file).name} if spec_file else
                                     {"vray.resume": str(resume)})
            return jobs, job_id
        except RuntimeError as exc:
            # a head that has just started answers before its job agent is up: wait for it, as a user would
            if "No available agent" not in str(exc) or time.time() > deadline:
                raise VrayError(f"the cluster refused the job: {exc}") from None
            time.sleep(2)


def follow(jobs: Any, job_id: str, echo: Callable[[str], None], timeout_s: float | None = None) -> str:
    """Print the job's logs as they come until it ends; its final status."""

    async def tail() -> None:
        async for lines in jobs.tail_job_logs(job_id):
            echo(lines.rstrip("\n"))

    try:
        asyncio.run(asyncio.wait_for(tail(), timeout_s) if timeout_s else tail())
    except asyncio.TimeoutError:
        pass
    return wait(jobs, job_id, timeout_s=60)


def wait(jobs: Any, job_id: str, timeout_s: float = 3600) -> str:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED (or the timeout passes); its status."""
    deadline = time.time() + timeout_s
    while True:
        status = str(jobs.get_job_status(job_id)).rsplit(".", 1)[-1]
        if status in TERMINAL or time.time() > deadline:
            return status
        time.sleep(1)


# What `vray train` prints on stderr once its run directory is decided (before any work starts); `vray jobs status`
# finds a job's run directory in its logs by it.
RUN_DIR_LINE = "run directory: "


def run_dir_in(logs: str) -> str | None:
    """The run directory a `vray train` job printed (the last one, should the logs hold several)."""
    found = [line[len(RUN_DIR_LINE):].strip() for line in logs.splitlines() if line.startswith(RUN_DIR_LINE)]
    return found[-1] if found and found[-1] else None


def status_lines(info: Any, logs: str, address: str | None = None) -> tuple[str, list[str]]:
    """A job's status word and what to tell about it: Ray's message and, for a `vray train` job that failed or was
    stopped (its driver died, was killed or raised) after its run directory was made, the command that resumes it
    from its last complete checkpoint. `info` is Ray's JobDetails (status, message, entrypoint)."""
    status = str(info.status).rsplit(".", 1)[-1]
    lines = [info.message] if info.message else []
    entry = str(getattr(info, "entrypoint", "") or "")
    if status in ("FAILED", "STOPPED") and entry.startswith("vray train"):
        run_dir = run_dir_in(logs)
        if run_dir is None:
            lines.append("it stopped before its run directory was made: submit it again")
        else:
            where = f" --address {address}" if address else ""
            lines.append(f"resume it from its last complete checkpoint: vray submit --resume {shlex.quote(run_dir)}"
                         f"{where} (or, where the run directory is reachable, vray train --resume "
                         f"{shlex.quote(run_dir)})")
    return status, lines
