"""Ray Serve config files: the vray application's arguments (`AppArgs`), its `applications:` entry, and reading,
writing and checking whole configs.

They are the standard `applications: [...]` format that `serve run`, `serve deploy`, `vray serve --config` and a
KubeRay RayService's `serveConfigV2` accept (the vLLM application is in vray.serve.vllm).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from vray.errors import VrayError
from vray.infer.target import ServeTarget
from vray.serve.options import ServeOptions

APP_NAME = "vray"  # the Serve application of `vray serve` (and of its vLLM engine)


@dataclass(frozen=True)
class AppArgs:
    """What the vray application serves and how: `vray serve`'s flags, and the `args:` of a Serve config's
    `vray.serve.app:app_builder` application, in one vocabulary."""

    target: str  # run directory, checkpoint, model folder or model source
    architecture: str | None = None  # NAME:SIZE, for a hub model
    task: str | None = None  # task of a base model
    api_key_env: str = "VRAY_API_KEY"  # the variable holding the API key (a config file keeps no secrets)
    allowed_image_hosts: tuple[str, ...] = ()
    adapters: dict[str, str] = field(default_factory=dict)  # extra adapter name -> run directory
    adapters_dir: str | None = None  # folder or s3:// prefix of runs of the same base
    serving: dict[str, Any] = field(default_factory=dict)  # overrides of the run's serving block
    insecure: bool = False  # serve without an API key (otherwise the app refuses to start without one)

    @classmethod
    def from_config(cls, args: dict[str, Any]) -> AppArgs:
        """The `args:` of a Serve config's application, checked."""
        known = sorted(f.name for f in fields(cls))
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise VrayError(f"vray.serve.app:app_builder args: unknown key(s) {', '.join(unknown)}; known: "
                            f"{', '.join(known)}")
        if "target" not in args:
            raise VrayError("vray.serve.app:app_builder args: 'target' (a run directory, checkpoint or model) is required")
        if not isinstance(args.get("insecure", False), bool):
            raise VrayError(f"vray.serve.app:app_builder args: insecure is {args['insecure']!r}; use true or false")
        return cls(target=str(args["target"]), architecture=args.get("architecture"), task=args.get("task"),
                   api_key_env=args.get("api_key_env") or "VRAY_API_KEY",
                   allowed_image_hosts=tuple(args.get("allowed_image_hosts") or ()),
                   adapters=dict(args.get("adapters") or {}), adapters_dir=args.get("adapters_dir"),
                   serving=dict(args.get("serving") or {}), insecure=args.get("insecure") is True)

    def to_config(self) -> dict[str, Any]:
        """The `args:` of a Serve config (what `from_config` reads back); unset keys are left out."""
        values = {"target": self.target, "api_key_env": self.api_key_env, "architecture": self.architecture,
                  "task": self.task, "allowed_image_hosts": list(self.allowed_image_hosts), "adapters": self.adapters,
                  "adapters_dir": self.adapters_dir, "serving": self.serving, "insecure": self.insecure}
        return {k: v for k, v in values.items() if v not in (None, {}, [], False)}

    def options(self, target: ServeTarget, api_key: str | None) -> ServeOptions:
        """The deployment's options for `target` (what `resolve_target(self.target, ...)` gave)."""
        return ServeOptions.resolve(target, self.serving, api_key=api_key, allowed_image_hosts=self.allowed_image_hosts,
                                    adapters=self.adapters, adapters_dir=self.adapters_dir)


def vray_application(args: AppArgs, options: ServeOptions) -> dict[str, Any]:
    """One `applications:` entry serving `args.target` with vray's transformers model server."""
    deployment = {"name": "ModelServer", **options.deployment_options()}
    return {"name": APP_NAME, "route_prefix": "/", "import_path": "vray.serve.app:app_builder", "args": args.to_config(),
            "deployments": [deployment, {"name": "Ingress", "num_replicas": 1, "max_ongoing_requests": 256,
                                         "ray_actor_options": {"num_cpus": 0}}]}


def serve_config(applications: list[dict[str, Any]], host: str = "127.0.0.1", port: int = 8000) -> dict[str, Any]:
    """A whole Serve config file."""
    return {"proxy_location": "EveryNode", "http_options": {"host": host, "port": port}, "applications": applications}


def validate_serve_config(config: Any, where: str = "the Serve config") -> dict[str, Any]:
    """The config if Ray Serve accepts it; a VrayError naming the problem otherwise."""
    from ray.serve.schema import ServeDeploySchema

    if not isinstance(config, dict) or "applications" not in config:
        raise VrayError(f"{where}: a Ray Serve config needs 'applications: [...]' at the top level")
    try:
        ServeDeploySchema.model_validate(config)
    except Exception as exc:  # noqa: BLE001 - pydantic lists every field
        raise VrayError(f"{where} is not a valid Ray Serve config:\n{exc}") from None
    return config


def write_config(path: str | Path, config: dict[str, Any], command: str) -> Path:
    """Write a Serve config YAML with a header saying how to run it."""
    validate_serve_config(config, str(path))
    out = Path(path)
    header = (f"# Ray Serve config written by `{command}`.\n"
              f"# Run it with `vray serve --config {out.name}`, `serve run {out.name}` or `serve deploy {out.name}`,\n"
              "# or paste `applications` into a KubeRay RayService's serveConfigV2. The vray app starts only with its\n"
              "# API key in VRAY_API_KEY (clients send it as 'Authorization: Bearer <key>'), or with `insecure: true`.\n")
    out.write_text(header + yaml.safe_dump(config, sort_keys=False))
    return out


def read_config(path: str | Path) -> dict[str, Any]:
    """A Serve config file, validated."""
    p = Path(path)
    if not p.is_file():
        raise VrayError(f"--config {path}: no such file")
    try:
        config = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise VrayError(f"--config {path}: not valid YAML ({exc})") from None
    return validate_serve_config(config, f"--config {path}")
