"""What to serve: a run's best (else latest) checkpoint, its final/ weights, a checkpoint, or a base model.

`resolve_target` reads what it is given (a run through its RunRecord); `run_target` turns a run's spec, plan and
checkpoint into the ServeTarget, for `vray serve` and a rendered RayService alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vray.archs import registry
from vray.errors import VrayError
from vray.plan.plan import Plan
from vray.spec import DEFAULT_SYSTEM_PROMPTS, EvaluationBlock, MediaBlock, QuantizationBlock, RunSpec, ServingBlock
from vray.storage.record import RunRecord
from vray.storage.rundir import CHECKPOINT_MARKER, RunDir, fetch_checkpoint, read_checkpoint_info


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
    evaluation: EvaluationBlock  # the defaults of every request
    checkpoint: str | None = None  # which checkpoint this is (for /v1/models and logs)
    quantization: QuantizationBlock | None = None  # a QLoRA adapter runs on the 4-bit base it was trained on
    serving: ServingBlock | None = None  # the run's serving block (replicas, batching, limits)
    stored: str | None = None  # the checkpoint folder as the run stores it: a remote one is fetched on each node
    media: MediaBlock | None = None  # the run's image sizes (what it trained on); unset: the family's default

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


def _serving_of(spec: RunSpec, plan: Plan | None) -> ServingBlock:
    """The run's serving block; a replica's GPU kind defaults to the one the run trained on."""
    if spec.serving.gpu is None and plan is not None and plan.device == "gpu":
        return spec.serving.model_copy(update={"gpu": plan.gpu})
    return spec.serving


def run_target(spec: RunSpec, plan: Plan | None, checkpoint: str | None = None, label: str | None = None,
               name: str | None = None) -> ServeTarget:
    """What serving a run means, from its spec, plan and checkpoint folder (local or remote; fetched here).

    Without a checkpoint (a run not trained yet, as a rendered RayService sees it) the target has no weights of
    its own: the deployment resolves them when it starts. `name`: the model id when the spec has no name."""
    info: dict[str, Any] = {}
    adapter = weights = None
    if checkpoint is not None:
        info = read_checkpoint_info(checkpoint)
        if not servable(info):
            raise VrayError(
                f"{checkpoint} holds training state only ({info.get('strategy')} {info.get('kind')} fine-tuning keeps "
                "the Hugging Face weights of full fine-tuning for final/): it resumes a run; serve, evaluate or export "
                "the run directory or its final/ folder")
        folder = fetch_checkpoint(checkpoint)  # a local copy when the run directory is remote
        if (folder / "adapter_config.json").exists():
            adapter = str(folder)
        else:
            weights = str(folder)
        trains_adapter = adapter is not None
    else:
        trains_adapter = spec.trainingMode.type == "LoRA"
    task = spec.effective_task or info.get("task")
    return ServeTarget(
        model_id=name or spec.name or Path(checkpoint or "").name,
        architecture=spec.arch.key,
        base_source=spec.model.source or spec.arch.repo_id,
        adapter=adapter,
        weights=weights,
        task=task,
        system_prompt=spec.systemPrompt,
        evaluation=spec.evaluation.for_task(task),  # a resolved spec has them already; a rendered one not yet
        checkpoint=label,
        quantization=spec.quantization if (trains_adapter and spec.quantization.enabled) else None,
        serving=_serving_of(spec, plan),
        stored=checkpoint,
        media=spec.media,
    )


def require_loadable(target: ServeTarget, base: bool = False) -> None:
    """Refuse, before any work, a target whose base model this machine could not load (not in the Hugging Face
    cache with the hub out of reach, say): the base is loaded unless the target has full weights of its own, and
    always with `base` (the baseline `vray eval` scores)."""
    from vray.models.loader import require_source

    if not (base or target.weights is None):
        return
    if target.checkpoint == "base":  # a model given as it is (a hub repo id)
        require_source(target.base_source, what="model", fix="give that folder instead")
    else:
        require_source(target.base_source, what=f"the base model of run {target.model_id}",
                       fix="set model.source in the run's spec.yaml to that folder or an s3:// copy")


def local_on_this_node(target: ServeTarget) -> ServeTarget:
    """The target with its checkpoint folder on this node: a remote checkpoint is fetched here (once per node).

    The checkpoint was chosen when the target was resolved; a replica never chooses again (`best` may have moved)."""
    if target.stored is None or "://" not in target.stored:
        return target
    folder = str(fetch_checkpoint(target.stored))
    if target.adapter is not None:
        return replace(target, adapter=folder)
    return replace(target, weights=folder)


def _folder_name(folder: str) -> str:
    return folder.rstrip("/").rsplit("/", 1)[-1]


def servable(info: dict[str, Any]) -> bool:
    """Whether a checkpoint has Hugging Face weights (an adapter or a model); older checkpoints always have."""
    return info.get("weights", "model") is not None


def _of_run(record: RunRecord) -> ServeTarget:
    """A run's best checkpoint, else its latest, else final/; a checkpoint that holds training state only (full
    fine-tuning on a sharded engine) is passed over."""
    candidates = [(record.best, "best"), (record.latest, "latest")]
    for folder, which in candidates:
        if folder is not None and servable(read_checkpoint_info(folder)):
            return run_target(record.spec, record.plan, folder, f"{which} ({_folder_name(folder)})")
    if record.final is not None:
        return run_target(record.spec, record.plan, record.final, "final")
    if record.latest is not None:
        return run_target(record.spec, record.plan, record.latest, f"latest ({_folder_name(record.latest)})")  # says why
    raise VrayError(f"{record.run.uri} has no complete checkpoint yet (checkpoints/step-N or final/); train it first")


def resolve_target(path_or_source: str, architecture: str | None = None, task: str | None = None) -> ServeTarget:
    """The ServeTarget for a run directory, a checkpoint folder, a merged/base model folder, or a model source."""
    p = Path(path_or_source).expanduser()
    if "://" in path_or_source or p.is_dir():
        here = RunDir.of(path_or_source)
        if here.exists("spec.yaml"):  # a run directory
            return _of_run(RunRecord.read(here))
        if here.exists(CHECKPOINT_MARKER):  # a checkpoint inside a run: checkpoints/step-N or final
            for root in (here.uri.rsplit("/", 2)[0], here.uri.rsplit("/", 1)[0]):
                if RunDir.of(root).exists("spec.yaml"):
                    record = RunRecord.read(root)
                    return run_target(record.spec, record.plan, here.uri, _folder_name(here.uri))
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
        evaluation=EvaluationBlock().for_task(task),
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
        from vray.models.loader import refuse_unsupported_layout

        refuse_unsupported_layout(p, source)  # NVILA-Lite's original VILA layout: refused, naming the -hf repo
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
