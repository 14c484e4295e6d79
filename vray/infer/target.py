"""What to serve: a run's best (else latest) checkpoint, its final/ weights, a checkpoint, or a base model."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from vray.archs import registry
from vray.errors import VrayError
from vray.spec import DEFAULT_SYSTEM_PROMPTS, EvaluationBlock, RunSpec, validate_spec
from vray.storage.rundir import (
    CHECKPOINT_MARKER,
    RunDir,
    fetch_checkpoint,
    read_checkpoint_info,
)


@dataclass(frozen=True)
class ServeTarget:
    """A servable model: base weights, an optional LoRA adapter, and the run's defaults."""

    model_id: str
    architecture: str  # registry key, name:size
    base_source: str  # model source of the base weights (tiny:, folder, s3://, repo id)
    adapter: str | None  # folder with adapter_config.json, when the weights are a LoRA adapter
    weights: str | None  # folder with full fine-tuned weights, when not an adapter
    task: str | None
    system_prompt: str | None
    evaluation: dict[str, Any]
    checkpoint: str | None = None  # which checkpoint this is (for /v1/models and logs)
    quantization: dict[str, Any] | None = None  # a QLoRA adapter runs on the 4-bit base it was trained on
    serving: dict[str, Any] | None = None  # the run's serving block (replicas, batching, limits)
    reference: str | None = None  # what was asked for (a remote run is fetched again on each replica's node)

    @property
    def base_id(self) -> str:
        """The base model's id in `<base>:<adapter>` model names: its repo id or source, or a folder's name."""
        source = self.base_source
        return Path(source).name if source.startswith("/") else source

    @property
    def arch(self) -> registry.Architecture:
        """The registry entry of the served model."""
        name, size = self.architecture.split(":", 1)
        return registry.get(name, size)

    @property
    def generation(self) -> EvaluationBlock:
        """The run's evaluation settings: the defaults of every request."""
        return EvaluationBlock(**self.evaluation)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (crosses into Ray Serve replicas)."""
        return asdict(self)


def _spec_of_run(run: RunDir) -> RunSpec:
    if not run.exists("spec.yaml"):
        raise VrayError(f"{run.uri} has no spec.yaml; is it a vray run directory?")
    return validate_spec(yaml.safe_load(run.read_text("spec.yaml")))


def _serving_of(spec: RunSpec, run: RunDir | None) -> dict[str, Any]:
    """The run's serving block; a replica's GPU kind defaults to the one the run trained on."""
    serving = spec.serving.model_dump()
    if serving.get("gpu") is None and run is not None and run.exists("plan.json"):
        plan = json.loads(run.read_text("plan.json"))
        if plan.get("device") == "gpu":
            serving["gpu"] = plan.get("gpu")
    return serving


def _from_checkpoint(where: Any, spec: RunSpec, label: str, run: RunDir | None = None) -> ServeTarget:
    info = read_checkpoint_info(where)
    folder = fetch_checkpoint(str(where))  # a local copy when the run directory is remote
    adapter = folder if (folder / "adapter_config.json").exists() else None
    return ServeTarget(
        model_id=spec.name or folder.name,
        architecture=spec.arch.key,
        base_source=spec.model.source or spec.arch.repo_id,
        adapter=str(adapter) if adapter else None,
        weights=None if adapter else str(folder),
        task=spec.effective_task or info.get("task"),
        system_prompt=spec.systemPrompt,
        evaluation=spec.evaluation.model_dump(),
        checkpoint=label,
        quantization=spec.quantization.model_dump() if (adapter and spec.quantization.enabled) else None,
        serving=_serving_of(spec, run),
    )


def resolve_target(path_or_source: str, architecture: str | None = None, task: str | None = None) -> ServeTarget:
    """The ServeTarget for a run directory, a checkpoint folder, a merged/base model folder, or a model source."""
    from dataclasses import replace

    return replace(_resolve_target(path_or_source, architecture, task), reference=path_or_source)


def local_on_this_node(target: ServeTarget) -> ServeTarget:
    """The target with its checkpoint folders on this node: a remote run is fetched here (once per node)."""
    if target.reference and "://" in target.reference and target.checkpoint != "base":
        from dataclasses import replace

        fresh = _resolve_target(target.reference)
        return replace(target, adapter=fresh.adapter, weights=fresh.weights)
    return target


def _resolve_target(path_or_source: str, architecture: str | None = None, task: str | None = None) -> ServeTarget:
    """The ServeTarget for a run directory, a checkpoint folder, a merged/base model folder, or a model source."""
    p = Path(path_or_source).expanduser()
    remote = "://" in path_or_source
    if (remote or p.is_dir()) and RunDir.of(path_or_source).exists("spec.yaml"):  # a run directory
        run = RunDir.of(path_or_source)
        spec = _spec_of_run(run)
        best, latest = run.best_checkpoint(), run.latest_checkpoint()
        if best is not None:
            return _from_checkpoint(best, spec, f"best ({str(best).rstrip('/').rsplit('/', 1)[-1]})", run)
        if latest is not None:
            return _from_checkpoint(latest, spec, f"latest ({str(latest).rstrip('/').rsplit('/', 1)[-1]})", run)
        if run.exists(f"final/{CHECKPOINT_MARKER}"):
            return _from_checkpoint(run.join("final"), spec, "final", run)
        raise VrayError(f"{path_or_source} has no complete checkpoint yet (checkpoints/step-N or final/); train it first")
    if (remote or p.is_dir()) and RunDir.of(path_or_source).exists(CHECKPOINT_MARKER):  # a checkpoint inside a run
        here = RunDir.of(path_or_source).uri
        for root in (here.rsplit("/", 2)[0], here.rsplit("/", 1)[0]):
            if RunDir.of(root).exists("spec.yaml"):
                return _from_checkpoint(here, _spec_of_run(RunDir.of(root)), here.rsplit("/", 1)[-1], RunDir.of(root))
        raise VrayError(f"{path_or_source} is a checkpoint outside its run directory (no spec.yaml beside it)")
    # A base or merged model: architecture from the registry by model_type, defaults from the registry.
    arch = _architecture_for(p, path_or_source, architecture)
    return ServeTarget(
        model_id=p.name if p.is_dir() else path_or_source,
        architecture=arch.key,
        base_source=str(p.resolve()) if p.is_dir() else path_or_source,
        adapter=None,
        weights=None,
        task=task,
        system_prompt=DEFAULT_SYSTEM_PROMPTS.get(task) if task else None,
        evaluation=EvaluationBlock().model_dump(),
        checkpoint="base",
    )


def _architecture_for(p: Path, source: str, architecture: str | None) -> registry.Architecture:
    if architecture:
        name, _, size = architecture.partition(":")
        return registry.get(name, size)
    for arch in registry.ARCHITECTURES:
        if arch.repo_id == source:
            return arch
    model_type = None
    if source.startswith("tiny:"):
        model_type = source.split(":", 1)[1]
    elif (p / "config.json").exists():
        model_type = json.loads((p / "config.json").read_text()).get("model_type")
    if model_type:
        matches = registry.by_model_type(model_type)
        if matches:
            return matches[0]
        raise VrayError(f"{source}: model_type {model_type!r} is not a supported architecture")
    raise VrayError(
        f"{source!r} is not a run directory, a checkpoint or a model folder; for a hub model pass "
        "--architecture NAME:SIZE as well"
    )
