"""Load a checkpoint (source resolution, dtype, quantization), its processor, and apply LoRA or freezing."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vray.archs.registry import Architecture
from vray.errors import VrayError
from vray.fs import filesystem
from vray.models.kernels import Kernels, apply_after_load, apply_compile, decoder_layers
from vray.models.quantized import keep_4bit_layout
from vray.spec import LoraBlock, MediaBlock, QuantizationBlock

DTYPES = {"BFloat16": torch.bfloat16, "Float16": torch.float16, "Float32": torch.float32}


def resolve_source(source: str, revision: str | None = None, cache_dir: Path | None = None) -> Path:
    """A local folder holding the checkpoint: tiny:<family>, a folder, an s3:// URI or a hub repo id."""
    if source.startswith("tiny:"):
        from vray.models.tiny import tiny_checkpoint

        return tiny_checkpoint(source.split(":", 1)[1], cache_dir)
    local = Path(source).expanduser()
    if local.exists():
        if not (local / "config.json").exists() and not (local / "adapter_config.json").exists():
            raise VrayError(f"model.source: {source!r} is a folder without config.json; point at a checkpoint folder")
        return refuse_unsupported_layout(local, source)
    if source.startswith("s3://"):
        return refuse_unsupported_layout(_fetch_s3(source, cache_dir), source)
    if source.startswith((".", "/", "~")):
        raise VrayError(f"model.source: {source!r} does not exist")
    return refuse_unsupported_layout(_fetch_hub(source, revision), source)


NVILA_HF_REPO = "Efficient-Large-Model/NVILA-Lite-2B-hf"


def refuse_unsupported_layout(folder: Path, source: str) -> Path:
    """`folder`, unless it holds NVILA-Lite in VILA's original layout (model_type llava_llama: the language model,
    tower and projector in llm/, vision_tower/ and mm_projector/ subfolders, loaded by VILA's own code), which vray
    refuses by name: it loads the Hugging Face layout of the same model."""
    import json

    config = folder / "config.json"
    if not config.exists():
        return folder
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError):
        return folder
    split = (folder / "llm").is_dir() and not any(folder.glob("*.safetensors"))
    if model_type == "llava_llama" or (model_type in ("vila", "nvila_lite") and split):
        raise VrayError(
            f"model.source: {source} is NVILA-Lite in VILA's original layout (model_type {model_type}, weights in "
            f"llm/, vision_tower/ and mm_projector/); vray loads the Hugging Face layout of the same model: use "
            f"{NVILA_HF_REPO} (model_type nvila_lite)")
    return folder


PROCESSOR_FILES = ["*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", "tokenizer*"]


def resolve_processor_source(source: str, revision: str | None = None, cache_dir: Path | None = None) -> Path:
    """A local folder with the checkpoint's processor files (tokenizer, chat template, image processor), without
    fetching the weights when the checkpoint is remote."""
    if source.startswith("tiny:") or Path(source).expanduser().exists():
        return resolve_source(source, revision, cache_dir)
    if source.startswith("s3://"):
        return _fetch_s3(source, cache_dir, patterns=PROCESSOR_FILES)
    from huggingface_hub import snapshot_download

    with _hub_errors(source, revision):
        return Path(snapshot_download(source, revision=revision, token=os.environ.get("HF_TOKEN"),
                                      allow_patterns=PROCESSOR_FILES))


def _cache_dir() -> Path:
    from vray.models.cache import cache_root

    return cache_root()


FETCHES = 0  # checkpoints this process copied from S3 (the rest came from the node's cache)


def _fetch_s3(uri: str, cache_dir: Path | None, patterns: list[str] | None = None) -> Path:
    """Copy an s3:// checkpoint (or only the files matching `patterns`) into the node's cache once; a marker
    file says the copy is complete, and a lock keeps the workers of a node from fetching it twice."""
    import fnmatch
    import hashlib

    from filelock import FileLock

    base = (cache_dir or _cache_dir()) / "models"
    base.mkdir(parents=True, exist_ok=True)
    key = uri + ("|" + ",".join(patterns) if patterns else "")
    folder = base / hashlib.sha256(key.encode()).hexdigest()[:16]
    done = folder / ".vray_complete"
    global FETCHES
    with FileLock(str(folder) + ".lock"):
        if not done.exists():
            FETCHES += 1
            fs, path = filesystem(uri)
            if not fs.exists(path):
                raise VrayError(f"model.source: {uri} does not exist (check the bucket, prefix and AWS_* settings)")
            root = path.rstrip("/")
            folder.mkdir(parents=True, exist_ok=True)
            for remote in fs.find(root):
                rel = remote[len(root) + 1:]
                if patterns and not any(fnmatch.fnmatch(rel.rsplit("/", 1)[-1], p) for p in patterns):
                    continue
                (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                fs.get(remote, str(folder / rel))
            done.write_text(uri + "\n")
    return folder


def _fetch_hub(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    with _hub_errors(repo_id, revision):
        return Path(snapshot_download(repo_id, revision=revision, token=os.environ.get("HF_TOKEN")))


@contextmanager
def _hub_errors(repo_id: str, revision: str | None, what: str = "model.source", fix: str | None = None) -> Iterator[None]:
    """The hub's refusals of `repo_id` as one-line VrayErrors naming `what` and how to provide the model (`fix`:
    what to do with a downloaded copy; default: set `what` to it)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    provide = f"download it where the hub is reachable and {fix or f'set {what} to that folder or an s3:// copy'}"
    try:
        yield
    except GatedRepoError:
        raise VrayError(f"{what}: {repo_id} is gated on the Hugging Face hub; accept its licence and set HF_TOKEN, "
                        f"or {provide}") from None
    except RepositoryNotFoundError:
        raise VrayError(f"{what}: {repo_id} is not a Hugging Face repo (or it is private: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise VrayError(f"model.revision: {revision!r} is not a revision of {repo_id}") from None
    except LocalEntryNotFoundError:  # offline or unreachable, and not (completely) in this machine's cache
        offline = " (HF_HUB_OFFLINE is set)" if _hub_offline() else ""
        raise VrayError(f"{what}: {repo_id} is not in the Hugging Face cache and the hub cannot be reached{offline}; "
                        f"{provide} (a gated repo also needs HF_TOKEN)") from None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def require_source(source: str, revision: str | None = None, what: str = "model.source", fix: str | None = None) -> None:
    """Refuse, before any work, a model source this machine could not load: a folder that is not there, or a hub
    repo that is neither in the Hugging Face cache nor reachable (offline, gated without HF_TOKEN, no such repo).
    Nothing large is downloaded: with the hub online, its answer for config.json is enough; offline, every file
    of the snapshot must be cached. An s3:// copy is checked when it is fetched."""
    if source.startswith(("tiny:", "s3://")):
        return
    if Path(source).expanduser().exists() or source.startswith((".", "/", "~")):
        resolve_source(source)  # a folder: nothing to fetch, only its checks
        return
    from huggingface_hub import hf_hub_download, snapshot_download

    with _hub_errors(source, revision, what, fix):
        if _hub_offline():
            snapshot_download(source, revision=revision, local_files_only=True)
        else:
            hf_hub_download(source, "config.json", revision=revision, token=os.environ.get("HF_TOKEN"))


def load_processor(path: Path, media: MediaBlock | None = None, max_pixels: int | None = None,
                   arch: Architecture | None = None) -> Any:
    """The checkpoint's processor, with the spec's media limits applied to image resizing; `max_pixels` caps the
    pixels one image is resized to on top of them (a server's bound on the visual tokens of one image). With
    `arch` and no `media.maxPixels`, the family's default size (`MediaBlock.default_cap`) caps the checkpoint's
    own (16384 visual tokens an image for the Qwen families)."""
    from transformers import AutoProcessor

    from vray.models import register_families

    register_families()
    if arch is not None:
        cap = (media or MediaBlock()).default_cap(arch)
        max_pixels = min(p for p in (max_pixels, cap) if p) if (max_pixels or cap) else None

    processor = AutoProcessor.from_pretrained(path)
    if hasattr(processor, "max_tiles"):  # a tiling family (NVILA-Lite): a pixel cap is a tile budget
        from vray.archs.vision import max_tiles_for, vision_dims

        v = vision_dims(arch.config) if arch is not None else None
        caps = [c for c in ((media.maxPixels if media is not None else None), max_pixels) if c]
        if caps and v is not None and v.kind == "nvila":
            processor.max_tiles = max_tiles_for(v, min(caps))
        return processor
    ip = getattr(processor, "image_processor", None)
    size = getattr(ip, "size", None)
    # transformers keeps the pixel budget as size.shortest_edge / size.longest_edge (a dict, or a SizeDict in 5.x).
    if size is not None and _size_get(size, "shortest_edge") is not None and (media is not None or max_pixels):
        limits = {"shortest_edge": _size_get(size, "shortest_edge"), "longest_edge": _size_get(size, "longest_edge")}
        if media is not None and media.minPixels:
            limits["shortest_edge"] = media.minPixels
        if media is not None and media.maxPixels:
            limits["longest_edge"] = media.maxPixels
        if max_pixels:
            longest = min(limits["longest_edge"] or max_pixels, max_pixels)
            limits = {"shortest_edge": min(limits["shortest_edge"] or longest, longest), "longest_edge": longest}
        ip.size = {**({k: v for k, v in dict(size).items() if v is not None} if isinstance(size, dict) else {}),
                   **limits}
    return processor


def _size_get(size: Any, key: str) -> Any:
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def check_device_precision(precision: str, device: torch.device) -> None:
    """Refuse a precision the device cannot train in, with the fix."""
    if device.type == "cpu" and precision == "Float16":
        raise VrayError("compute.precisionType: Float16 needs a GPU; use BFloat16 or Float32 on CPU")
    if device.type == "cuda" and precision == "BFloat16" and not torch.cuda.is_bf16_supported():
        raise VrayError("compute.precisionType: this GPU has no bfloat16 support (pre-Ampere); use Float16")


def model_kwargs(arch: Architecture, device: torch.device, kernels: Kernels | None = None) -> dict[str, Any]:
    """Loading options that depend on the device: the chosen kernels' (`vray.models.kernels`) when given; otherwise,
    on a GPU, the fused experts of sparse-MoE families run transformers' grouped GEMM
    (`experts_implementation="grouped_mm"`) instead of a Python loop over experts. None on the CPU."""
    if kernels is not None:
        return kernels.load_kwargs()
    if device.type == "cuda" and arch.model_type.endswith("_moe"):
        return {"experts_implementation": "grouped_mm"}
    return {}


def require_native(arch: Architecture) -> None:
    """Refuse an architecture whose model class is not in transformers."""
    if not arch.native:
        raise VrayError(
            f"{arch.key}: {arch.transformers_class} is remote code outside transformers; vray plans it but "
            "does not load it for training or serving yet"
        )


def load_model(path: Path, arch: Architecture, precision: str, quantization: QuantizationBlock | None = None,
               device: torch.device | None = None, kernels: Kernels | None = None) -> nn.Module:
    """The model from a checkpoint folder at the run's precision (4-bit through bitsandbytes when asked).

    Each tensor goes from the memory-mapped safetensors file straight to `device` in `precision`: no rank holds a
    CPU copy of the model on the way. (Sharded plans build the model with `vray.models.sharded` instead.)
    """
    from transformers import AutoModelForImageTextToText

    from vray.models import register_families

    register_families()
    require_native(arch)
    device = device or torch.device("cpu")
    check_device_precision(precision, device)
    kwargs: dict[str, Any] = {"dtype": DTYPES[precision], **model_kwargs(arch, device, kernels)}
    if quantization is not None and quantization.enabled:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization.type.lower(),
            bnb_4bit_compute_dtype=DTYPES[precision],
            bnb_4bit_use_double_quant=True,
            # Keep the vision tower, projector and LM head in the compute dtype (matched from the module name's start).
            llm_int8_skip_modules=list(arch.vision_modules + arch.projector_modules) + ["lm_head"],
        )
    model = AutoModelForImageTextToText.from_pretrained(path, device_map={"": device}, **kwargs)
    keep_4bit_layout(model)  # evaluation must never repack 4-bit weights (vray.models.quantized)
    return model


def _modules_under(model: nn.Module, prefixes: tuple[str, ...]) -> list[nn.Module]:
    named = dict(model.named_modules())
    return [named[p] for p in prefixes if p in named]


def freeze(model: nn.Module, prefixes: tuple[str, ...]) -> int:
    """Freeze every parameter under the named modules; returns how many parameters were frozen."""
    frozen = 0
    for module in _modules_under(model, prefixes):
        for p in module.parameters():
            if p.requires_grad:
                p.requires_grad_(False)
                frozen += p.numel()
    return frozen


EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def lora_target_modules(model: nn.Module, arch: Architecture, lora: LoraBlock) -> list[str]:
    """Full names of the Linear modules LoRA adapts: the language model's targets, plus every Linear of the
    projector and vision tower when the scope includes them."""
    selection = arch.lora_selection(lora.targets, lora.scope)
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and selection.adapts(name)]


def apply_lora(model: nn.Module, arch: Architecture, lora: LoraBlock) -> nn.Module:
    """Wrap the model with peft LoRA (base weights frozen): the language model's targets by default, the
    projector / vision tower when in `lora.scope`, the fused routed experts with `lora.experts`."""
    from peft import LoraConfig, get_peft_model

    targets = lora_target_modules(model, arch, lora)
    if not targets:
        raise VrayError(f"lora.targets: no Linear module of {arch.key} matches {list(lora.targets or arch.lora_targets)}")
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        target_parameters=list(EXPERT_PARAMETERS) if lora.experts else None,
        bias="none",
    )
    model = get_peft_model(model, config)
    _adapters_follow_autocast(model)
    return model


def _adapters_follow_autocast(model: nn.Module) -> None:
    """Under autocast, the adapters' GEMMs take the layer's input as it is (bf16 / fp16) and autocast runs them in
    the compute dtype over the fp32 master adapter weights. peft would first cast each input to the adapter's fp32
    (a copy of every adapted Linear's input that autocast casts straight back); without autocast it still does,
    so an fp32 adapter never meets a bf16 input."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and hasattr(module, "_cast_input_dtype"):
            cast = module._cast_input_dtype

            def follow(x: Any, dtype: torch.dtype, cast: Any = cast) -> Any:
                if isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type):
                    return x
                return cast(x, dtype)

            module._cast_input_dtype = follow


def parameter_groups(model: nn.Module, arch: Architecture, lr: float, vision_lr: float | None = None,
                     projector_lr: float | None = None) -> list[dict[str, Any]]:
    """Optimizer parameter groups of the trainable parameters: vision tower, projector and the rest, each with its
    learning rate (the run's, unless one is given)."""
    projector = tuple(p + "." for p in arch.projector_modules)
    vision = tuple(p + "." for p in arch.vision_modules)
    groups: dict[str, list[nn.Parameter]] = {"vision": [], "projector": [], "language": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        bare = name.removeprefix("base_model.model.")
        key = "projector" if bare.startswith(projector) else ("vision" if bare.startswith(vision) else "language")
        groups[key].append(p)
    rates = {"vision": vision_lr or lr, "projector": projector_lr or lr, "language": lr}
    return [{"params": ps, "lr": rates[k], "name": k} for k, ps in groups.items() if ps]


def apply_full(model: nn.Module, arch: Architecture, train_vision: bool = False) -> nn.Module:
    """Full fine-tuning: every parameter trains except the vision tower (unless asked)."""
    for p in model.parameters():
        p.requires_grad_(True)
    if not train_vision:
        vision_only = tuple(m for m in arch.vision_modules)
        projectors = tuple(arch.projector_modules)
        freeze(model, vision_only)
        for module in _modules_under(model, projectors):  # the projector trains even inside the vision tower
            for p in module.parameters():
                p.requires_grad_(True)
    return model


def load_precision(mode: str, precision: str, strategy: str) -> str:
    """The precision the weights are loaded in. LoRA: the run's. Full fine-tuning: fp32 where the engine steps the
    weights themselves as the master copy (ddp's torch optimizer, FSDP2's fp32 shards); the run's precision under
    DeepSpeed, which keeps its own fp32 master partitions."""
    if mode != "Full" or strategy.startswith("zero"):
        return precision
    return "Float32"


def enable_gradient_checkpointing(model: nn.Module, arch: Architecture, reentrant: bool = False, every: int = 1) -> None:
    """Recompute decoder layers (and vision blocks) in the backward pass instead of keeping their activations:
    every decoder layer with `every` = 1, else only every `every`-th one (layers 0, k, 2k, ...: the others keep
    their activations, which costs memory and saves their recompute). The vision blocks are checkpointed either
    way (only while they train: a frozen tower runs without grad).

    Non-reentrant checkpointing (the default) needs no input that requires grad, so no input embedding is hooked.
    transformers hooks the input embeddings of every sub-model when checkpointing is enabled, and peft again when
    it wraps the model: the vision tower's patch embedding among them, which makes a frozen tower build an
    autograd graph, be recomputed and run a whole backward. Here the hook goes, for good (peft's later call
    included), on the language model's `embed_tokens` only and only for reentrant checkpointing, which needs it.
    The parts of the vision tower that do not train run without grad (`_frozen_vision_without_grad`)."""
    if every < 1:
        raise VrayError(f"cluster.gradientCheckpointing: every:{every} must recompute every k-th layer for k >= 1")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    for i, layer in enumerate(decoder_layers(model, arch)):
        layer.gradient_checkpointing = i % every == 0

    def hook_language_inputs_only() -> None:
        model.disable_input_require_grads()
        if reentrant:
            try:
                embed = model.get_submodule(f"{arch.language_model_prefix}.embed_tokens")
            except AttributeError:
                embed = model.get_input_embeddings()
            model._require_grads_hooks = [embed.register_forward_hook(lambda m, i, out: out.requires_grad_(True))]

    hook_language_inputs_only()
    model.enable_input_require_grads = hook_language_inputs_only  # what peft calls when it wraps the model
    _frozen_vision_without_grad(model, arch)


def _needs_grad(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> bool:
    """Whether a call of `module` builds an autograd graph: a parameter of it trains, or an input requires grad."""
    if any(p.requires_grad for p in module.parameters()):
        return True
    values = [*args, *kwargs.values()]
    values += [v for x in list(values) if isinstance(x, (tuple, list)) for v in x]
    return any(isinstance(v, torch.Tensor) and v.requires_grad for v in values)


def _frozen_vision_without_grad(model: nn.Module, arch: Architecture) -> None:
    """The vision tower, its direct children and its blocks run under `torch.no_grad()` whenever nothing in them
    trains and no input requires grad (decided at each call: LoRA or freezing may come later). A frozen tower
    then keeps no activations and runs no backward, while a projector inside it (Qwen's merger) still trains."""
    named = dict(model.named_modules())
    for prefix in arch.vision_modules:
        tower = named.get(prefix)
        if tower is None:
            continue
        lists = [m for m in tower.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
        blocks = list(max(lists, key=len)) if lists else []
        children = [m for m in tower.children() if not isinstance(m, nn.ModuleList)]
        for module in dict.fromkeys([tower, *children, *blocks]):
            _run_without_grad_when_frozen(module)


def _run_without_grad_when_frozen(module: nn.Module) -> None:
    forward = module.forward

    def run(*args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled() and not _needs_grad(module, args, kwargs):
            with torch.no_grad():
                return forward(*args, **kwargs)
        return forward(*args, **kwargs)

    module.forward = run


def prepare_for_training(path: Path, arch: Architecture, mode: str, precision: str, quantization: QuantizationBlock | None,
                         lora: LoraBlock, device: torch.device, gradient_checkpointing: bool = False,
                         train_vision: bool = False, strategy: str = "ddp",
                         deepspeed_config: dict[str, Any] | None = None, checkpoint_every: int = 1,
                         kernels: Kernels | None = None) -> tuple[nn.Module, torch.dtype | None]:
    """The model ready to train, and the autocast dtype its forward runs under (None: no autocast).

    How it is built follows the plan's engine, so that no rank ever holds the whole model when the plan shards it:
    - ddp, zero1, zero2: loaded straight onto the device (`load_model`);
    - zero3, zero3-offload: built partitioned under `zero.Init`, then each rank reads its partitions
      (`vray.models.sharded.build_partitioned`, `materialize_partitioned`);
    - fsdp2, fsdp2-hybrid: built on the meta device (`vray.models.sharded.build_empty`); the engine shards it and
      then reads each rank's rows of the weights (`vray.models.sharded.materialize_sharded`).

    LoRA / QLoRA: the base at the run's precision (4-bit Linear weights under QLoRA), fp32 master adapters whose
    GEMMs run in the run's precision under autocast (DeepSpeed casts the module to it and keeps the fp32 masters
    itself: no autocast there). `checkpoint_every`: with `gradient_checkpointing`, every k-th decoder layer is
    recomputed (`enable_gradient_checkpointing`). `kernels`: the GPU kernels chosen for the run
    (`vray.models.kernels.choose`; None: the defaults, as on the CPU).
    Full: trainable weights in fp32 where the engine keeps them as the master copy (`load_precision`), with the
    forward in the run's precision under autocast; frozen weights (the vision tower) stored at the run's precision.
    """
    full = mode == "Full"
    loaded = load_precision(mode, precision, strategy)
    if strategy.startswith(("fsdp2", "zero3")):
        check_device_precision(precision, device)
        require_native(arch)
        from vray.models import sharded

        if strategy.startswith("fsdp2"):
            model = sharded.build_empty(path, DTYPES[loaded], **model_kwargs(arch, device, kernels))
        else:
            if deepspeed_config is None:
                raise VrayError(f"plan.strategy {strategy} needs the plan's DeepSpeed config")
            model = sharded.build_partitioned(path, DTYPES[loaded], deepspeed_config,
                                              **model_kwargs(arch, device, kernels))
            sharded.materialize_partitioned(model, path)
    else:
        model = load_model(path, arch, loaded, quantization, device, kernels)
    if kernels is not None:
        apply_after_load(model, arch, kernels)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model, arch, every=checkpoint_every)
    autocast = DTYPES[precision] if precision != "Float32" else None
    if not full:
        rng = torch.get_rng_state()
        model = apply_lora(model, arch, lora)
        if strategy.startswith("fsdp2"):  # the adapters' initial values are recomputed when the weights are read
            from vray.models.sharded import LORA_RNG

            setattr(model, LORA_RNG, rng)
    else:
        model = apply_full(model, arch, train_vision)
        dtype = DTYPES[precision]
        for p in model.parameters():
            if not p.requires_grad and p.dtype != dtype:
                p.data = p.data.to(dtype)
    if kernels is not None:
        apply_compile(model, arch, kernels)
    if not full and strategy.startswith("zero"):
        return model, None
    return model, autocast


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
