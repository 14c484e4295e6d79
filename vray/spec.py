"""RunSpec: the one validated description of a run, read from YAML, a saved run.json and `--set` overrides.

The model block keeps the camelCase keys of a saved run.json (architecture, trainingMode, quantization,
compute, hyperparameters, evaluation); vray adds lora, task, systemPrompt, data, name, output, model,
media, cluster and seed. Every problem is reported at once, naming the field, the value and what is allowed.
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vray.archs import registry
from vray.errors import SpecError, VrayError

TASKS = ("phrase_grounding", "vqa", "freeform")
# The `synthetic:<name>` datasets (vray.data.synthetic writes them) and the task of each.
SYNTHETIC_TASKS = {"vqa": "vqa", "grounding": "phrase_grounding", "phrase_grounding": "phrase_grounding",
                   "freeform": "freeform"}
TRAINING_MODES = ("LoRA", "Full")
QUANT_TYPES = ("NF4", "FP4")
PRECISIONS = ("BFloat16", "Float16", "Float32")
OPTIMIZERS = ("AdamW", "Adam", "SGD", "Adafactor")

# The model block of a saved run.json: these keys and no others come from `--run-json`.
MODEL_BLOCK_KEYS = ("architecture", "trainingMode", "quantization", "compute", "hyperparameters", "evaluation")

DEFAULT_SYSTEM_PROMPTS = {
    "vqa": "You are a visual assistant. Answer the question about the image briefly and precisely.",
    "phrase_grounding": (
        "You are a visual grounding assistant. Locate every object the phrase describes and return its "
        "bounding box with its label."
    ),
    "freeform": "You are a helpful visual assistant. Follow the instruction using what the image shows.",
}

# The training strategies, each with an engine in vray.train.engines; everything else names them from here.
Strategy = Literal["ddp", "zero1", "zero2", "zero3", "zero3-offload", "fsdp2", "fsdp2-hybrid"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
DEEPSPEED_STRATEGIES = tuple(s for s in STRATEGIES if s.startswith("zero"))
FSDP2_STRATEGIES = tuple(s for s in STRATEGIES if s.startswith("fsdp2"))


def _canonical(value: Any, choices: tuple[str, ...]) -> Any:
    """Accept any capitalisation of a choice ("lora", "bfloat16") and return its canonical spelling."""
    if isinstance(value, str):
        for c in choices:
            if value.lower() == c.lower():
                return c
    return value


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ArchitectureBlock(_Block):
    """`architecture {name, size}`: one of the registry's 21 checkpoints."""

    name: str = "qwen3.5"
    size: str = "4B"

    @model_validator(mode="after")
    def _known(self) -> ArchitectureBlock:
        try:
            registry.get(self.name, self.size)
        except VrayError as exc:  # names the valid architectures or sizes
            raise ValueError(str(exc)) from None
        return self


class TrainingModeBlock(_Block):
    type: Literal["LoRA", "Full"] = Field("LoRA", description="QLoRA is LoRA with quantization.enabled: true")

    @field_validator("type", mode="before")
    @classmethod
    def _case(cls, v: Any) -> Any:
        return _canonical(v, TRAINING_MODES)


class QuantizationBlock(_Block):
    enabled: bool = False
    type: Literal["NF4", "FP4"] = "NF4"

    @field_validator("type", mode="before")
    @classmethod
    def _case(cls, v: Any) -> Any:
        return _canonical(v, QUANT_TYPES)


class ComputeBlock(_Block):
    precisionType: Literal["BFloat16", "Float16", "Float32"] = "BFloat16"
    compile: bool = Field(False, description=(
        "compile each decoder layer with torch.compile on a GPU (regional compilation: one layer's compile time, "
        "fused norms and elementwise ops); ddp plans only, ignored on the CPU"))

    @field_validator("precisionType", mode="before")
    @classmethod
    def _case(cls, v: Any) -> Any:
        return _canonical(v, PRECISIONS)


class HyperparametersBlock(_Block):
    epochs: int = Field(10, gt=0, description="complete passes over the training data")
    learningRate: float = Field(1e-4, gt=0, description="peak learning rate; typical 1e-5 to 1e-4")
    batchSize: int = Field(8, ge=1, description="samples per optimizer step before accumulation")
    gradientAccumulation: int = Field(1, ge=1)
    optimizer: Literal["AdamW", "Adam", "SGD", "Adafactor"] = "AdamW"
    warmupRatio: float = Field(0.03, ge=0, lt=1, description="share of steps spent warming the learning rate up")
    weightDecay: float = Field(0.0, ge=0)
    maxGradNorm: float = Field(1.0, gt=0)

    @field_validator("optimizer", mode="before")
    @classmethod
    def _case(cls, v: Any) -> Any:
        return _canonical(v, OPTIMIZERS)

    @property
    def effective_batch(self) -> int:
        """Samples per optimizer step: batchSize x gradientAccumulation (the planner preserves it)."""
        return self.batchSize * self.gradientAccumulation


# Sampling defaults per task, for what a spec leaves unset. Grounding and VQA answers have a fixed format (boxes,
# short answers), so they decode greedily with no repetition penalty (box lists repeat brackets and digits);
# freeform text samples. `EvaluationBlock.for_task` is the one place that applies them.
TASK_SAMPLING: dict[str | None, dict[str, float]] = {
    "phrase_grounding": {"temperature": 0.0, "repetitionPenalty": 1.0},
    "vqa": {"temperature": 0.0, "repetitionPenalty": 1.0},
    "freeform": {"temperature": 1.0, "repetitionPenalty": 1.05},
    None: {"temperature": 1.0, "repetitionPenalty": 1.05},  # no task known: as freeform
}


class EvaluationBlock(_Block):
    """How answers are generated (evaluation during training, `vray eval` / `predict`, and serving's defaults)."""

    maxNewTokens: int = Field(512, ge=1)
    topK: int = Field(50, ge=0, description="0 disables top-k")
    topP: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass, in (0, 1]")
    temperature: float | None = Field(None, ge=0, description="0 means greedy decoding (default: 0 for "
                                      "phrase_grounding and vqa, 1.0 for freeform)")
    repetitionPenalty: float | None = Field(None, gt=0, description="must be > 0; 1.0 is off, 1.1-1.3 discourages "
                                            "repeats (default: 1.0 for phrase_grounding and vqa, 1.05 for freeform)")
    maxSamples: int | None = Field(256, ge=1, description="held-out samples scored at each evaluation during training "
                                   "(the first N of the eval set; null: all of them)")
    batchSize: int | None = Field(None, ge=1, description="held-out samples generated together per rank during "
                                  "training (default: the plan's micro-batch, which fits beside training)")

    def for_task(self, task: str | None) -> EvaluationBlock:
        """The block with the task's sampling defaults (`TASK_SAMPLING`) where the spec set no value."""
        unset = {k: v for k, v in TASK_SAMPLING.get(task, TASK_SAMPLING[None]).items() if getattr(self, k) is None}
        return self.model_copy(update=unset) if unset else self


class LoraBlock(_Block):
    """Maps onto peft's LoraConfig (r, lora_alpha, lora_dropout, target_modules, target_parameters)."""

    rank: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1, description="adapter dropout (default 0, as peft and Unsloth: the "
                           "fast path, with no dropped copy of every adapted layer's input kept for the backward)")
    targets: tuple[str, ...] | None = None
    scope: tuple[Literal["language", "projector", "vision"], ...] = Field(
        ("language",), description="where adapters go: the language model, and optionally the projector and vision tower")
    experts: bool = Field(False, description="also adapt the routed experts of MoE models (fused 3-D parameters)")

    @field_validator("scope")
    @classmethod
    def _has_language(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if "language" not in v:
            raise ValueError("scope must include 'language' (add 'projector' and 'vision' to it)")
        return tuple(dict.fromkeys(v))


class FullBlock(_Block):
    """Full fine-tuning options: the vision tower is frozen unless trainVision; separate learning rates."""

    trainVision: bool = False
    visionLearningRate: float | None = Field(None, gt=0)
    projectorLearningRate: float | None = Field(None, gt=0)
    routerAuxLossCoef: float | None = Field(
        None, ge=0, description="weight of the MoE router's load-balancing loss (sparse-MoE families; default: the "
        "checkpoint's router_aux_loss_coef; 0 turns it off)")


class CheckpointingBlock(_Block):
    """When to evaluate and checkpoint, and how many checkpoints to keep."""

    everySteps: int | None = Field(None, ge=1, description="evaluate and checkpoint every N optimizer steps "
                                   "(default: after every epoch)")
    keepBest: int = Field(2, ge=1, description="checkpoints kept by the task's metric, besides the latest")


class DataBlock(_Block):
    train: str | None = None
    eval: str | None = None
    maxTokens: int | None = Field(None, ge=16, description="token budget of one sample (default: the model's context)")
    preprocessors: int | None = Field(None, ge=0, le=64, description="Ray Data preprocessing actors per training worker "
                                      "(0: threads inside the worker; default 1 on GPUs, 0 on CPU workers)")
    packTokens: int | None = Field(None, ge=0, description="padding-free packing: the samples of a micro-batch are "
                                   "concatenated into rows of at most this many tokens (default: the planner's "
                                   "choice; 0: no packing, micro-batches padded to their longest sample)")


class ModelBlock(_Block):
    source: str | None = None
    revision: str | None = None


class MediaBlock(_Block):
    minPixels: int | None = Field(None, ge=1)
    maxPixels: int | None = Field(None, ge=1, description="pixels of one image after resizing (default: the "
                                  "family's, 1280 visual tokens for the Qwen families)")
    maxFrames: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _order(self) -> MediaBlock:
        if self.minPixels and self.maxPixels and self.minPixels > self.maxPixels:
            raise ValueError(f"minPixels ({self.minPixels}) is larger than maxPixels ({self.maxPixels})")
        return self

    def default_cap(self, arch: registry.Architecture) -> int | None:
        """Without a maxPixels of the spec's own: the family's default size (`vray.archs.vision.default_max_pixels`,
        never below minPixels), which caps what the checkpoint's processor allows; None otherwise."""
        if self.maxPixels is not None:
            return None
        from vray.archs.vision import default_max_pixels

        default = default_max_pixels(arch)
        return None if default is None else max(default, self.minPixels or 0)

    def for_arch(self, arch: registry.Architecture) -> MediaBlock:
        """The block with the family's default maxPixels filled in when the spec sets none (what the planner and
        the data check's estimate size an image by)."""
        cap = self.default_cap(arch)
        return self if cap is None else self.model_copy(update={"maxPixels": cap})


# Preemption notices a run survives unless cluster.maxPreemptions says otherwise: a long spot run is reclaimed more
# than once, and a bound stops a restart loop (a group placed again and again on nodes that are going away).
DEFAULT_MAX_PREEMPTIONS = 10


class ClusterBlock(_Block):
    gpu: str | None = None
    gpusPerNode: int | None = Field(None, ge=1)
    nodes: int | None = Field(None, ge=1)
    workers: int | None = Field(None, ge=1)
    cpusPerWorker: int | None = Field(None, ge=1)
    strategy: Strategy | None = Field(
        None, description="use this engine instead of the planner's choice")
    gradientCheckpointing: str = Field(
        "auto", pattern=r"^(auto|on|off|every:[1-9][0-9]*)$",
        description="recompute activations in the backward pass: auto (the planner decides, by estimated step "
        "time within memory; off on CPU workers), on (every decoder layer and vision block), off, or every:k "
        "(every k-th decoder layer)")
    maxPreemptions: int = Field(
        DEFAULT_MAX_PREEMPTIONS, ge=0,
        description="preemption notices the run survives (a node drained as preempted, e.g. a spot reclaim): each "
        "one writes a checkpoint at the step in flight and restarts from it; 0 stops the run at the first notice "
        "(after that checkpoint); budgeted apart from worker failures")
    maxFailures: int = Field(
        0, ge=0,
        description="worker failures the run survives (a worker process killed, out of memory, or its node lost "
        "without a preemption notice): Ray Train restarts the group, which restores the newest complete checkpoint "
        "and trains the steps since again; 0 (Ray Train's default) stops the run at the first failure")
    preemptionGraceS: float = Field(
        0, ge=0,
        description="seconds past a preemption notice's deadline that Ray Train keeps the surviving workers before "
        "it restarts the group (room for a checkpoint that outlasts the deadline)")

    @property
    def checkpoint_every(self) -> int | None:
        """k of `gradientCheckpointing: every:k`, 1 for on, 0 for off, None for auto."""
        setting = self.gradientCheckpointing
        if setting.startswith("every:"):
            return int(setting.split(":", 1)[1])
        return {"on": 1, "off": 0}.get(setting)


class ServingBlock(_Block):
    """How `vray serve` deploys the run: Ray Serve replicas, autoscaling, batching, adapters and request limits."""

    minReplicas: int = Field(1, ge=0, description="replicas kept when idle (0 scales to zero)")
    maxReplicas: int = Field(1, ge=1, description="most replicas the autoscaler starts")
    targetOngoingRequests: float | None = Field(None, gt=0, description="requests per replica the autoscaler aims "
                                                                       "for (default: maxBatchSize)")
    upscaleDelayS: float = Field(30, ge=0)
    downscaleDelayS: float = Field(300, ge=0)
    replicaCpus: float = Field(1, gt=0, description="CPUs per replica")
    gpu: str | None = Field(None, description="GPU kind of a replica (default: the run's cluster.gpu; none: CPU)")
    maxBatchSize: int = Field(8, ge=1, description="requests generated together by @serve.batch (1 turns it off)")
    batchWaitTimeoutS: float = Field(0.02, ge=0, description="how long a batch waits to fill")
    maxModelLen: int = Field(8192, ge=256, description="prompt plus completion tokens one request may use")
    maxAdapters: int = Field(4, ge=1, description="LoRA adapters kept loaded per replica (least recently used go)")
    maxImages: int = Field(4, ge=1, description="images one request may carry")
    maxImageMB: float = Field(20, gt=0, description="bytes of one image")
    maxImagePixels: int = Field(4096 * 4096, ge=1, description="width x height of one image")
    maxBodyMB: float = Field(64, gt=0, description="bytes of one request body")

    @model_validator(mode="after")
    def _replicas(self) -> ServingBlock:
        if self.minReplicas > self.maxReplicas:
            raise ValueError(f"minReplicas ({self.minReplicas}) is larger than maxReplicas ({self.maxReplicas})")
        return self


def default_output() -> str:
    """Where runs go when the spec names no output: $VRAY_STORAGE, else ~/vray-runs."""
    return os.environ.get("VRAY_STORAGE") or str(Path("~/vray-runs").expanduser())


class RunSpec(_Block):
    """A whole run: the model block of a saved run.json plus task, data, storage and cluster overrides."""

    architecture: ArchitectureBlock = ArchitectureBlock()
    trainingMode: TrainingModeBlock = TrainingModeBlock()
    quantization: QuantizationBlock = QuantizationBlock()
    compute: ComputeBlock = ComputeBlock()
    hyperparameters: HyperparametersBlock = HyperparametersBlock()
    evaluation: EvaluationBlock = EvaluationBlock()
    lora: LoraBlock = LoraBlock()
    full: FullBlock = FullBlock()
    checkpointing: CheckpointingBlock = CheckpointingBlock()
    task: Literal["phrase_grounding", "vqa", "freeform"] | None = None
    systemPrompt: str | None = None
    data: DataBlock = DataBlock()
    name: str | None = None
    output: str | None = None
    model: ModelBlock = ModelBlock()
    media: MediaBlock = MediaBlock()
    cluster: ClusterBlock = ClusterBlock()
    serving: ServingBlock = ServingBlock()
    seed: int = 0

    @field_validator("task", mode="before")
    @classmethod
    def _task_alias(cls, v: Any) -> Any:
        if isinstance(v, str):
            v2 = v.strip().lower().replace("-", "_").replace(" ", "_")
            return {"grounding": "phrase_grounding", "phrasegrounding": "phrase_grounding", "free_form": "freeform"}.get(v2, v2)
        return v

    @field_validator("name")
    @classmethod
    def _name_is_a_folder(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", v):
            raise ValueError(f"'{v}' is not a usable run name: use letters, digits, '.', '_' and '-' (a folder name)")
        return v

    @model_validator(mode="after")
    def _combinations(self) -> RunSpec:
        arch = self.arch
        problems = []
        if self.trainingMode.type == "LoRA" and not arch.lora_supported:
            problems.append(
                f"trainingMode.type: LoRA is not supported by {arch.name} (full fine-tuning only); "
                "set trainingMode.type: Full, or pick an architecture that supports LoRA"
            )
        if self.quantization.enabled and self.trainingMode.type == "Full":
            problems.append(
                "quantization.enabled: 4-bit quantization trains adapters only (QLoRA); "
                "set trainingMode.type: LoRA, or quantization.enabled: false for full fine-tuning"
            )
        source = self.model.source or ""
        if source.startswith("tiny:"):
            family = source.split(":", 1)[1]
            if family != arch.model_type:
                problems.append(
                    f"model.source: '{source}' is a {family} checkpoint but architecture {arch.key} is "
                    f"{arch.model_type}; use tiny:{arch.model_type} or an architecture of the {family} family"
                )
        if self.lora.targets is not None and self.trainingMode.type == "LoRA":
            if not self.lora.targets:
                problems.append("lora.targets: an empty list adapts nothing; omit it for the architecture's defaults")
        if self.lora.experts and self.trainingMode.type == "LoRA" and not arch.is_moe:
            problems.append(f"lora.experts: {arch.key} has no routed experts (MoE models only); remove lora.experts")
        if self.lora.experts and self.lora.dropout > 0:
            problems.append(f"lora.experts: adapters on the fused expert parameters cannot apply dropout; "
                            f"set lora.dropout: 0 (got {self.lora.dropout})")
        if self.full.trainVision and self.trainingMode.type != "Full":
            problems.append("full.trainVision: applies to full fine-tuning; for LoRA on the vision tower set "
                            "lora.scope: [language, vision]")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    # ---- derived values -------------------------------------------------------------------------
    @property
    def arch(self) -> registry.Architecture:
        """The registry checkpoint this spec names."""
        return registry.get(self.architecture.name, self.architecture.size)

    @property
    def effective_task(self) -> str | None:
        """The task, or the one a `synthetic:<task>` dataset implies."""
        if self.task:
            return self.task
        train = self.data.train or ""
        if train.startswith("synthetic:"):
            return SpecLoader.synthetic_task(train)
        return None

    def resolved(self, now: datetime | None = None) -> RunSpec:
        """A copy with every default filled in: task, system prompt, name, output, model source and the task's
        sampling settings. media.maxPixels stays unset: the family's default caps the checkpoint's own size where a
        processor is loaded (`vray.models.loader.load_processor`)."""
        task = self.effective_task
        updates: dict[str, Any] = {"task": task}
        if self.systemPrompt is None and task:
            updates["systemPrompt"] = DEFAULT_SYSTEM_PROMPTS[task]
        if self.name is None:
            stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
            updates["name"] = f"{self.architecture.name}-{self.architecture.size}-{task or 'run'}-{stamp}"
        if self.output is None:
            updates["output"] = default_output()
        if self.model.source is None:
            updates["model"] = ModelBlock(source=self.arch.repo_id, revision=self.model.revision)
        if self.lora.targets is None and self.arch.lora_supported:
            updates["lora"] = self.lora.model_copy(update={"targets": self.arch.lora_targets})
        updates["evaluation"] = self.evaluation.for_task(task)
        return self.model_copy(update=updates)

    @property
    def media_limits(self) -> MediaBlock:
        """The media block with the family's default image size filled in (the planner's sample image)."""
        return self.media.for_arch(self.arch)

    @property
    def run_dir(self) -> str:
        """`<output>/<name>` of a resolved spec (a local path or an s3:// URI)."""
        if not self.name or not self.output:
            raise ValueError("run_dir needs a resolved spec (call .resolved() first)")
        return self.run_dir_of(self.name)

    @property
    def storage(self) -> str:
        """Where this spec's runs go: output, else the default output ($VRAY_STORAGE, else ~/vray-runs)."""
        return self.output or default_output()

    def run_dir_of(self, name: str) -> str:
        """`<storage>/<name>`: where a run of this spec named `name` lives."""
        return self.storage.rstrip("/") + "/" + name

    def to_dict(self) -> dict[str, Any]:
        """Plain data with the spec's own keys (what `spec.yaml` in a run directory holds)."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        """The spec as YAML, loadable by `load_spec`."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


# ---- loading --------------------------------------------------------------------------------------


def _allowed_keys(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _block_model(model: type[BaseModel], key: str) -> type[BaseModel] | None:
    field = model.model_fields.get(key)
    ann = getattr(field, "annotation", None)
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _split_unknown_keys(data: Any, model: type[BaseModel], where: str = "") -> tuple[Any, list[str]]:
    """(data without unknown keys, one message per unknown key naming the key that was probably meant)."""
    if not isinstance(data, dict):
        return data, []
    known: dict[str, Any] = {}
    problems = []
    allowed = _allowed_keys(model)
    for key, value in data.items():
        path = f"{where}{key}"
        if key not in allowed:
            hint = registry.suggest(str(key), allowed)
            problems.append(f"{path}: unknown key{hint}; allowed here: {', '.join(allowed)}")
            continue
        sub = _block_model(model, key)
        if sub is not None:
            value, sub_problems = _split_unknown_keys(value, sub, f"{path}.")
            problems.extend(sub_problems)
        known[key] = value
    return known, problems


_NAMES_ITS_FIELD = re.compile(r"^[A-Za-z]+(\.[A-Za-z]+)*: ")


def _describe(error: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in error["loc"] if not str(p).startswith("function-"))
    msg = error["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if error["type"] == "value_error" and _NAMES_ITS_FIELD.match(msg):
        return msg  # validators that name their own fields (cross-field checks, registry lookups)
    given = error.get("input")
    shown = "" if isinstance(given, (dict, list)) or given is None else f"got {given!r}: "
    field = _field_for(error["loc"])
    extra = f" ({field.description})" if field is not None and field.description else ""
    if shown and msg[:1].isupper():
        msg = msg[0].lower() + msg[1:]
    return f"{loc or 'spec'}: {shown}{msg}{extra}"


def _field_for(loc: tuple) -> Any:
    model: type[BaseModel] | None = RunSpec
    field = None
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        field = model.model_fields[part]
        model = _block_model(model, part)
    return field


def validate_spec(data: dict[str, Any]) -> RunSpec:
    """A RunSpec from plain data, or one SpecError listing every problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError([f"spec: expected a mapping of keys to values, got {type(data).__name__}"])
    known, problems = _split_unknown_keys(data, RunSpec)
    try:
        spec = RunSpec.model_validate(known)
    except ValidationError as exc:
        for err in exc.errors():
            for line in _describe(err).split("\n"):
                if line not in problems:
                    problems.append(line)
    if problems:
        raise SpecError(problems)
    return spec


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (['a', 'b'], value), the value read as YAML (numbers, booleans, lists)."""
    if "=" not in text:
        raise SpecError([f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. hyperparameters.epochs=3"])
    key, _, raw = text.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise SpecError([f"--set {text!r}: the key is empty"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of `data` with each `a.b=value` applied (creating blocks as needed)."""
    out = json.loads(json.dumps(data)) if data else {}
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    return out


class SpecLoader:
    """Reads specs from files; kept as one place so the CLI, jobs and tests read them the same way."""

    @staticmethod
    def synthetic_task(uri: str) -> str | None:
        """The task of a `synthetic:<task>` data URI."""
        name = uri.split(":", 1)[1].split("?", 1)[0]
        return SYNTHETIC_TASKS.get(name, name) if name else None

    @staticmethod
    def read_yaml(path: str | Path) -> dict[str, Any]:
        """A spec file as plain data; a SpecError when it is missing or not YAML."""
        p = Path(path)
        if not p.exists():
            raise SpecError([f"spec file {str(p)!r} does not exist"])
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise SpecError([f"{p}: not valid YAML: {exc}"]) from None
        return data or {}

    @staticmethod
    def model_block_of_run_json(path: str | Path) -> dict[str, Any]:
        """The model block of a saved run.json (the block whose settings hold `architecture`)."""
        p = Path(path)
        if not p.exists():
            raise SpecError([f"--run-json {str(p)!r} does not exist"])
        try:
            doc = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise SpecError([f"--run-json {p}: not valid JSON: {exc}"]) from None
        block = _find_model_block(doc)
        if block is None:
            raise SpecError([f"--run-json {p}: no model block found (an object with an 'architecture' key)"])
        extra = [k for k in block if k not in MODEL_BLOCK_KEYS]
        if extra:
            raise SpecError(
                [f"--run-json {p}: model block key '{k}' is not a model setting{registry.suggest(k, list(MODEL_BLOCK_KEYS))}; "
                 f"allowed: {', '.join(MODEL_BLOCK_KEYS)}" for k in extra]
            )
        return block


def _find_model_block(doc: Any) -> dict[str, Any] | None:
    if isinstance(doc, dict):
        if isinstance(doc.get("architecture"), dict):
            return doc
        for key in ("settings", "model", "spec", "blocks"):
            if key in doc:
                found = _find_model_block(doc[key])
                if found is not None:
                    return found
        for value in doc.values():
            found = _find_model_block(value)
            if found is not None:
                return found
    elif isinstance(doc, list):
        for item in doc:
            found = _find_model_block(item)
            if found is not None:
                return found
    return None


def load_spec(
    path: str | Path | None = None,
    *,
    run_json: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
    task: str | None = None,
    data: str | None = None,
    eval_data: str | None = None,
    output: str | None = None,
) -> RunSpec:
    """The RunSpec from a YAML file or a run.json model block, CLI fields and `--set` overrides."""
    if path is not None and run_json is not None:
        raise SpecError(["give a spec file or --run-json, not both"])
    raw: dict[str, Any] = dict(base or {})
    if path is not None:
        raw.update(SpecLoader.read_yaml(path))
    if run_json is not None:
        raw.update(SpecLoader.model_block_of_run_json(run_json))
    if task is not None:
        raw["task"] = task
    if data is not None or eval_data is not None:
        block = dict(raw.get("data") or {})
        if data is not None:
            block["train"] = data
        if eval_data is not None:
            block["eval"] = eval_data
        raw["data"] = block
    if output is not None:
        raw["output"] = output
    raw = apply_overrides(raw, overrides or [])
    return validate_spec(raw)


def require_for_training(spec: RunSpec) -> None:
    """Fail before any work when a spec lacks what training needs (task and training data)."""
    problems = []
    if spec.effective_task is None:
        problems.append(f"task: required for training; one of {', '.join(TASKS)} (or pass --task)")
    if not spec.data.train:
        problems.append("data.train: required for training; a JSONL/Parquet path, an s3:// URI or synthetic:<task> (or pass --data)")
    elif spec.data.train.startswith("synthetic:"):
        t = SpecLoader.synthetic_task(spec.data.train)
        if t not in TASKS:
            problems.append(f"data.train: '{spec.data.train}' names no synthetic task; use synthetic:vqa, synthetic:grounding or synthetic:freeform")
        elif spec.task and spec.task != t:
            problems.append(f"data.train: '{spec.data.train}' is {t} data but task is {spec.task}")
    if problems:
        raise SpecError(problems)


def token_budget(spec: RunSpec) -> int:
    """The most tokens one sample may take: data.maxTokens, else the model's context length."""
    return spec.data.maxTokens or spec.arch.context_length
