"""Serving a run on vLLM through `ray.serve.llm`: when its adapter must be merged first, the application entry,
and the adapter published where Ray Serve LLM loads LoRA adapters from.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vray.errors import VrayError
from vray.fs import filesystem
from vray.infer.target import ServeTarget
from vray.serve.config import APP_NAME
from vray.serve.options import ServeOptions

VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM's max_lora_rank accepts


def _adapter_config(target: ServeTarget) -> dict[str, Any]:
    return json.loads((Path(target.adapter) / "adapter_config.json").read_text()) if target.adapter else {}


def vllm_merge_reason(target: ServeTarget) -> str | None:
    """Why vLLM cannot apply this run's adapter as a LoRA (so it must be merged first), or None."""
    if not target.adapter:
        return None
    if target.arch.is_moe:
        return "vLLM does not apply LoRA to fused MoE experts"
    cfg = _adapter_config(target)
    if cfg.get("target_parameters"):
        return "the adapter trains routed-expert parameters, which vLLM cannot apply as LoRA"
    if _adapts_vision(target):
        return "the adapter reaches the vision tower or projector; vLLM applies LoRA to language-model modules only"
    if target.quantization:
        return "a QLoRA adapter was trained on a 4-bit base; merge it into the dequantized base"
    return None


def vllm_family_refusal(target: ServeTarget) -> str | None:
    """Why vLLM cannot serve the target's architecture at all (one vray implements itself), or None."""
    arch = target.arch
    if arch.implemented_by_vray:
        return f"vLLM has no {arch.display.rsplit(' ', 1)[0]} model (vray implements {arch.model_type} itself)"
    return None


def vllm_lora_refusal(target: ServeTarget, lora_prefix: str | None) -> str | None:
    """Why vLLM cannot serve the run's adapter, unmerged, from `lora_prefix` (and what to do), or None."""
    reason = vllm_merge_reason(target)
    if reason:
        return f"{reason}; write the config with --merge (vray merges the adapter into its base first)"
    if target.adapter and not lora_prefix:
        return ("vLLM loads LoRA adapters from cloud storage (s3://, gs://); give --lora-prefix s3://... "
                "(vray copies the adapter there), or --merge to serve a merged checkpoint")
    return None


def _adapts_vision(target: ServeTarget) -> bool:
    """Whether the adapter's weights reach the vision tower or projector (read from the tensor names: peft keeps only
    module-name suffixes in adapter_config.json)."""
    from safetensors import safe_open

    prefixes = tuple(f".{p}." for p in target.arch.vision_modules + target.arch.projector_modules)
    for file in Path(target.adapter).glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as fh:
            if any(any(p in f".{key}" for p in prefixes) for key in fh.keys()):
                return True
    return False


def _lora_rank(target: ServeTarget) -> int:
    rank = int(_adapter_config(target).get("r", 16))
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise VrayError(f"LoRA rank {rank} is above what vLLM serves ({VLLM_LORA_RANKS[-1]}); merge the adapter instead")


def vllm_application(target: ServeTarget, options: ServeOptions, *, merged: str | None = None,
                     lora_prefix: str | None = None) -> dict[str, Any]:
    """One `applications:` entry for `ray.serve.llm:build_openai_app` serving the run on vLLM.

    `merged`: a merged export to serve as the model; `lora_prefix`: the s3:// prefix holding `<adapter>/` folders
    (the run's adapter published there), for runs served as base + LoRA."""
    replica = options.replica
    family = vllm_family_refusal(target)
    if family:
        raise VrayError(f"--engine vllm: {family}; serve it with --engine transformers (what auto picks for it)")
    if not replica.num_gpus:
        raise VrayError("vLLM serves on GPUs: set the serving GPU with --gpu NAME (or serving.gpu in the spec)")
    serving = options.serving
    engine: dict[str, Any] = {"dtype": "bfloat16", "max_model_len": serving.maxModelLen,
                              "tensor_parallel_size": replica.tensor_parallel,
                              "limit_mm_per_prompt": {"image": serving.maxImages, "video": 0}}
    loading: dict[str, Any] = {"model_id": target.model_id}
    config: dict[str, Any] = {"model_loading_config": loading, "engine_kwargs": engine,
                              "accelerator_type": replica.ray_actor_options().get("accelerator_type"),
                              "deployment_config": {"autoscaling_config": options.autoscaling_config(),
                                                    "max_ongoing_requests": max(64, options.max_ongoing_requests())}}
    if merged:
        loading["model_source"] = merged
    elif target.adapter:
        refusal = vllm_lora_refusal(target, lora_prefix)
        if refusal:
            raise VrayError(refusal)
        loading.update(model_id=target.base_id, model_source=target.base_source)
        engine.update(enable_lora=True, max_lora_rank=_lora_rank(target), max_loras=serving.maxAdapters)
        config["lora_config"] = {"dynamic_lora_loading_path": lora_prefix.rstrip("/"),
                                 "max_num_adapters_per_replica": serving.maxAdapters}
    else:
        loading["model_source"] = target.weights or target.base_source
    if config["accelerator_type"] is None:
        del config["accelerator_type"]
    return {"name": APP_NAME, "route_prefix": "/", "import_path": "ray.serve.llm:build_openai_app",
            "args": {"llm_configs": [config]}}


def validate_llm_configs(application: dict[str, Any]) -> None:
    """Check a vLLM application's `llm_configs` against Ray Serve LLM's own schema (importable without vLLM)."""
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig

    for i, cfg in enumerate(application["args"]["llm_configs"]):
        try:
            LLMConfig.model_validate(cfg)
        except Exception as exc:  # noqa: BLE001
            raise VrayError(f"llm_configs[{i}] is not a valid ray.serve.llm LLMConfig:\n{exc}") from None


def publish_adapter(target: ServeTarget, prefix: str, name: str) -> str:
    """Copy the run's adapter to `<prefix>/<name>/`, where Ray Serve LLM looks for LoRA `name`."""
    dest = f"{prefix.rstrip('/')}/{name}"
    fs, path = filesystem(dest)
    for file in Path(target.adapter).iterdir():
        if file.is_file():
            fs.put_file(str(file), f"{path}/{file.name}")
    return dest


def vllm_app_for_run(ref: str, target: ServeTarget, options: ServeOptions, merge: bool, lora_prefix: str | None,
                     say: Callable[[str], None]) -> dict[str, Any]:
    """The checked ray.serve.llm application for `ref`: merged first when asked (written beside the run, once), or
    base + LoRA with the adapter published under `lora_prefix` when vLLM can apply it."""
    merged = None
    if merge and target.adapter:
        from vray.infer.export import export_merged
        from vray.storage.rundir import RunDir

        if "://" in ref:
            raise VrayError("--merge writes the merged checkpoint beside the run; export it first with "
                            "`vray export RUN --merge --out FOLDER` and serve that folder")
        folder = RunDir.of(ref).root / "export" / "merged"
        if not (folder / "config.json").exists():
            say(f"merging the adapter into its base: {folder}")
            export_merged(ref, str(folder))
        merged = str(folder)
    elif target.adapter and lora_prefix and not vllm_merge_reason(target):
        dest = publish_adapter(target, lora_prefix, target.model_id)
        say(f"published the adapter to {dest}; request it as model '{target.base_id}:{target.model_id}'")
    application = vllm_application(target, options, merged=merged, lora_prefix=lora_prefix)
    validate_llm_configs(application)
    return application
