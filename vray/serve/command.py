"""`vray serve` as steps: its flags become AppArgs, the target is resolved once, then a Serve config is written,
or the target is deployed with vray's model server or on vLLM; a Serve config file deploys as it is.

Progress goes to the caller's console (stderr); what a step returns (a written file, a URL) is the caller's to print.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from vray.errors import VrayError
from vray.infer.target import ServeTarget
from vray.serve import runner
from vray.serve.config import AppArgs

ENGINES = ("auto", "transformers", "vllm")
NO_KEY_ON_VLLM = ("the vLLM OpenAI app (ray.serve.llm) checks no API key: serve it on 127.0.0.1 behind your own gateway, "
                  "or pass --insecure to expose it without one")


def _absolute(ref: str) -> str:
    """A local path made absolute (a Serve config is read elsewhere); a URI as it is."""
    return ref if "://" in ref else str(Path(ref).expanduser().resolve())


def serving_overrides(items: list[str], min_replicas: int | None = None, max_replicas: int | None = None,
                      max_batch_size: int | None = None, gpu: str | None = None) -> dict[str, Any]:
    """The serving-block overrides of `--serving KEY=VALUE` and the shorthand flags (which win)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise VrayError(f"--serving {item!r}: use KEY=VALUE (keys of the spec's serving block)")
        overrides[key.strip()] = yaml.safe_load(value)
    overrides.update({k: v for k, v in {"minReplicas": min_replicas, "maxReplicas": max_replicas,
                                         "maxBatchSize": max_batch_size}.items() if v is not None})
    if gpu is not None:
        overrides["gpu"] = None if gpu.lower() in ("none", "cpu", "") else gpu
    return overrides


def named_adapters(items: list[str]) -> dict[str, str]:
    """`--adapter NAME=RUN` flags as {name: run}, local runs made absolute."""
    named: dict[str, str] = {}
    for item in items:
        name, sep, where = item.partition("=")
        if not sep or not name or not where:
            raise VrayError(f"--adapter {item!r}: use NAME=RUN_DIR")
        named[name] = _absolute(where)
    return named


def vllm_installed() -> bool:
    """Whether vLLM can be imported here."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def pick_engine(*, gpus: int, has_vllm: bool, refusal: str | None) -> tuple[str, str]:
    """What `--engine auto` serves with, and the line that says so: vLLM for replicas on GPUs where vLLM is
    installed and can serve the target as asked (`refusal`: why it cannot), transformers elsewhere."""
    if not gpus:
        return "transformers", "engine: transformers (the replicas get no GPU; with --gpu NAME and vLLM installed, auto picks vLLM)"
    if not has_vllm:
        return "transformers", "engine: transformers (vLLM is not installed here; `pip install vllm` and auto picks it on GPUs)"
    if refusal:
        return "transformers", f"engine: transformers, not vLLM: {refusal}"
    return "vllm", f"engine: vLLM ({gpus} GPU(s) per replica; --engine transformers serves with vray's model server)"


def app_args(target: str, architecture: str | None = None, task: str | None = None,
             allowed_image_hosts: tuple[str, ...] = (), adapters: dict[str, str] | None = None,
             adapters_dir: str | None = None, serving: dict[str, Any] | None = None, insecure: bool = False) -> AppArgs:
    """The application `vray serve TARGET ...` deploys, local paths made absolute (model sources stay as they are)."""
    local = not target.startswith("tiny:") and Path(target).expanduser().exists()
    return AppArgs(target=_absolute(target) if local else target, architecture=architecture, task=task,
                   allowed_image_hosts=tuple(allowed_image_hosts), adapters=dict(adapters or {}),
                   adapters_dir=None if adapters_dir is None else _absolute(adapters_dir), serving=dict(serving or {}),
                   insecure=insecure)


@dataclass(frozen=True)
class Served:
    """What `serve` did, for the caller to print: a written config, or where the model answers now."""

    written: Path | None = None
    url: str | None = None


def serve(app: AppArgs, *, given: str, engine: str = "auto", host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, detach: bool = False, insecure: bool = False, verbose: bool = False,
          merge: bool = False, lora_prefix: str | None = None, write_config: Path | None = None,
          console: Console) -> Served:
    """Resolve `app.target` once, then write its Serve config (`write_config`), deploy it detached, or serve it
    until Ctrl-C. `given`: the target as the user wrote it (for the config's header)."""
    from vray.infer.target import resolve_target
    from vray.serve.config import serve_config, vray_application
    from vray.serve.vllm import vllm_family_refusal, vllm_lora_refusal

    if engine not in ENGINES:
        raise VrayError(f"--engine {engine!r}: choose auto, transformers or vllm")
    target = resolve_target(app.target, architecture=app.architecture, task=app.task)
    if write_config is None:
        require_loadable_where_served(target, verbose)
    options = app.options(target, api_key)
    unkeyed = bool(api_key) or (not runner.is_loopback(host) and not insecure)  # vLLM's app would check no key
    if engine == "auto":
        refusal = ("the vLLM OpenAI app checks no API key, and this deployment needs one" if unkeyed
                   else vllm_family_refusal(target) or (None if merge else vllm_lora_refusal(target, lora_prefix)))
        engine, line = pick_engine(gpus=options.replica.num_gpus, has_vllm=vllm_installed(), refusal=refusal)
        console.print(line, highlight=False)
    if engine == "vllm":
        from vray.serve.vllm import vllm_app_for_run

        application = vllm_app_for_run(app.target, target, options, merge, lora_prefix, console.print)
    else:
        application = vray_application(app, options)
    if write_config is not None:
        from vray.serve.config import write_config as write

        out = write(write_config, serve_config([application], host, port), f"vray serve {given} --write-config")
        console.print(f"wrote {out}; deploy it with `vray serve --config {out}` or `serve deploy {out}`")
        return Served(written=out)
    if engine == "vllm":
        if unkeyed:
            raise VrayError(NO_KEY_ON_VLLM)
        urls = runner.deploy_config(serve_config([application], host, port), detach=detach, insecure=True, verbose=verbose)
        if not detach:
            runner.block_until_interrupted(f"{target.model_id} on vLLM at {urls[0]}", console, (application["name"],))
        return Served(url=urls[0])
    console.print(f"deploying {target.model_id} ({target.checkpoint}) ...")
    endpoint = runner.deploy(target, options, host=host, port=port, detach=detach, insecure=insecure, verbose=verbose)
    if detach:
        console.print(f"serving {endpoint.model_id} at {endpoint.url}; stop with `serve shutdown -y` (and `ray stop`)")
    else:
        runner.block_until_interrupted(f"{endpoint.model_id} at {endpoint.url}", console)
    return Served(url=endpoint.url)


def require_loadable_where_served(target: ServeTarget, verbose: bool = False) -> None:
    """Refuse, before deploying, a model the replicas could not load: checked in one Ray task with their environment
    on the cluster they will join (a driver without hub access does not refuse a cluster that has it), or here,
    where a cluster started for them runs."""
    from vray.cluster import ensure_ray, joined_cluster, on_a_worker
    from vray.infer.target import require_loadable

    if not joined_cluster():
        require_loadable(target)
        return
    ensure_ray(verbose)
    on_a_worker(require_loadable, target)


def serve_config_file(path: Path, *, detach: bool = False, insecure: bool = False, verbose: bool = False,
                      console: Console) -> list[str]:
    """Deploy a Serve config file's applications as they are; block until Ctrl-C unless `detach`. Their URLs.
    `insecure` lets vray apps start without their API key, as `insecure: true` in their args does."""
    from vray.serve.config import read_config

    config = read_config(path)
    if insecure:
        for app in config["applications"]:
            if app.get("import_path", "").startswith("vray."):
                app.setdefault("args", {})["insecure"] = True
    names = tuple(a["name"] for a in config["applications"])
    urls = runner.deploy_config(config, detach=detach, insecure=insecure, verbose=verbose)
    if detach:
        console.print(f"deployed {', '.join(names)}; stop with `serve shutdown -y` (and `ray stop`)")
    else:
        runner.block_until_interrupted(f"{', '.join(names)} at {', '.join(urls)}", console, names)
    return urls
