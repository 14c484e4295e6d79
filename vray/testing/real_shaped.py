"""Checkpoints of a supported architecture's real shape with random weights, written without a download (for
benchmarks and memory measurements)."""

from __future__ import annotations

from pathlib import Path

from vray.archs import registry
from vray.models.loader import load_processor
from vray.models.tiny import tiny_checkpoint, use_token_ids


def write_real_shaped_checkpoint(arch: registry.Architecture, folder: Path, text_layers: int | None = None,
                                  device: str = "cpu") -> Path:
    """A checkpoint of the architecture's real shape with random bf16 weights (no download), with the family's
    tiny tokenizer (its special tokens; ids inside the real vocabulary) and its image processor at the real
    resolution limits. For GPU benchmarks. `text_layers` keeps only the language model's first layers (the real
    widths and vocabulary, and the vision tower whole); `device` is where the random weights are drawn."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vray.models import register_families

    register_families()

    processor = load_processor(tiny_checkpoint(arch.model_type))
    ids = {t: processor.tokenizer.convert_tokens_to_ids(t) for t in processor.tokenizer.all_special_tokens}
    ip = processor.image_processor
    if arch.model_type == "internvl":
        ip.size, ip.crop_to_patches, ip.max_patches = {"height": 448, "width": 448}, True, 12
        processor.image_seq_length = 256
    else:
        factor = ip.patch_size * ip.merge_size
        ip.size = {"shortest_edge": 4 * factor * factor, "longest_edge": 16384 * factor * factor}
    cfg = use_token_ids(arch.config, arch.model_type, ids)
    if text_layers is not None:
        text = dict(cfg.get("text_config", cfg))
        text["num_hidden_layers"] = text_layers
        if text.get("layer_types"):
            text["layer_types"] = text["layer_types"][:text_layers]
        cfg = {**cfg, "text_config": text} if "text_config" in cfg else text
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


VISION_DEPTH_KEYS = ("depth", "num_hidden_layers")


def write_sized_checkpoint(arch: registry.Architecture, folder: Path, *, text_layers: int | None = None,
                           vision_layers: int | None = None, dtype: str = "float32", shard_bytes: int = 4 * 2**30,
                           seed: int = 0) -> Path:
    """A checkpoint of the architecture's real widths and vocabulary with `text_layers` decoder layers and
    `vision_layers` vision blocks (the real counts when None), random weights in `dtype`, in safetensors shards of at
    most `shard_bytes` as on the hub. It is written one shard at a time, so writing it never holds the model in
    memory: for measuring what loading a model of real size costs."""
    import json

    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vray.models import register_families

    register_families()

    processor = load_processor(tiny_checkpoint(arch.model_type))
    ids = {t: processor.tokenizer.convert_tokens_to_ids(t) for t in processor.tokenizer.all_special_tokens}
    cfg = use_token_ids(arch.config, arch.model_type, ids)
    text, vision = cfg.get("text_config", cfg), cfg.get("vision_config", {})
    if text_layers is not None:
        text["num_hidden_layers"] = text_layers
        if isinstance(text.get("layer_types"), list):
            text["layer_types"] = text["layer_types"][:text_layers]
    if vision_layers is not None:
        for key in VISION_DEPTH_KEYS:
            if key in vision:
                vision[key] = vision_layers
        for key in ("fullatt_block_indexes", "deepstack_visual_indexes"):
            if key in vision:
                vision[key] = [i for i in vision[key] if i < vision_layers] or [vision_layers - 1]
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch_dtype = getattr(torch, dtype)
    with init_empty_weights():
        model = AutoModelForImageTextToText.from_config(config, dtype=torch_dtype)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    seen: set[int] = set()
    tensors: list[tuple[str, torch.Size]] = []
    for name, p in model.named_parameters():  # a tied weight is stored once, under its first name
        if id(p) not in seen:
            seen.add(id(p))
            tensors.append((name, p.shape))
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    weight_map: dict[str, int] = {}
    element = torch.empty((), dtype=torch_dtype).element_size()

    def flush(last: bool) -> None:
        index = len(shards)
        save_file(shards[-1], str(folder / f"model-{index:05d}.safetensors"), metadata={"format": "pt"})
        shards[-1] = {}
        if not last:
            shards.append({})
            sizes.append(0)

    for name, shape in tensors:
        nbytes = int(torch.Size(shape).numel()) * element
        if sizes[-1] and sizes[-1] + nbytes > shard_bytes:
            flush(last=False)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "bias":
            value = torch.zeros(shape, dtype=torch_dtype)
        elif "norm" in name:
            value = torch.ones(shape, dtype=torch_dtype)
        else:
            value = torch.empty(shape, dtype=torch.float32).normal_(0.0, 0.02, generator=generator).to(torch_dtype)
        shards[-1][name] = value
        sizes[-1] += nbytes
        weight_map[name] = len(shards)
    flush(last=True)
    count = len(sizes)
    files = {i: f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)}
    for i, final in files.items():
        (folder / f"model-{i:05d}.safetensors").rename(folder / final)
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": {k: files[v] for k, v in weight_map.items()}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
