"""Building a model without its weights, and filling sharded parameters from the checkpoint slice by slice.

FSDP2 runs build the model on the meta device, shard it with `fully_shard`, and only then read the weights: each
rank reads the rows of each tensor it owns straight out of the memory-mapped safetensors files (file-backed pages,
not anonymous memory), in chunks of at most `LOAD_CHUNK_BYTES`, and casts them into its local shard. No rank holds
the whole model at any point, and the planner's load-time peak (`vray.plan.memory`) counts exactly this.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vray.errors import VrayError

LOAD_CHUNK_BYTES = 64 * 2**20  # the most a rank reads of one tensor at a time (source dtype)
PEFT_PREFIX = "base_model.model."


def build_empty(path: Path, dtype: torch.dtype, **kwargs: Any) -> nn.Module:
    """The checkpoint's model class built from its config.json with every parameter on the meta device (no memory),
    and its buffers (rotary frequencies and the like, computed at construction) real, on the CPU."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from vray.models import register_families

    register_families()
    unset_hf_deepspeed_config()  # a ZeRO-3 run earlier in this process must not put this build under zero.Init
    config = AutoConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, **kwargs)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def build_partitioned(path: Path, dtype: torch.dtype, deepspeed_config: dict[str, Any], **kwargs: Any) -> nn.Module:
    """The checkpoint's model class built under DeepSpeed's `zero.Init` while a `HfDeepSpeedConfig` is alive (as
    transformers does for ZeRO-3): each parameter is partitioned over the ranks as its module is created, without
    initial values (every weight is read from the checkpoint next, by `materialize_partitioned`). The returned model
    holds the live config, which must outlive the DeepSpeed engine's creation."""
    import deepspeed
    import transformers.integrations.deepspeed as hf_deepspeed
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.integrations import HfDeepSpeedConfig

    from vray.models import register_families

    register_families()
    deepspeed.init_distributed(auto_mpi_discovery=False, verbose=False)  # on the existing process group
    live = HfDeepSpeedConfig(deepspeed_config)  # transformers reads it through a weak reference
    config = AutoConfig.from_pretrained(path)
    # transformers would initialise every partitioned weight after construction by gathering each module in turn;
    # they are all overwritten from the checkpoint right after, so that pass is skipped.
    # zero.Init also broadcasts every new parameter from rank 0 before partitioning it, so that all ranks start from
    # the same random values: a whole-model broadcast, and on every other rank a full copy of each tensor in turn.
    # The values are read from the checkpoint instead, so each parameter is only partitioned.
    from deepspeed.runtime.zero.partition_parameters import Init

    initialise, init_param = hf_deepspeed.initialize_weights_zero3, Init._zero_init_param
    hf_deepspeed.initialize_weights_zero3 = lambda model: None
    Init._zero_init_param = _partition_only
    try:
        with _tied_head_without_storage(config):
            model = AutoModelForImageTextToText.from_config(config, dtype=dtype, **kwargs)
    finally:
        hf_deepspeed.initialize_weights_zero3, Init._zero_init_param = initialise, init_param
    model._vray_zero3_config = live
    return model


@contextmanager
def _tied_head_without_storage(config: Any) -> Iterator[None]:
    """With tied embeddings, the LM head's weight is replaced by the input embedding's right after construction; under
    zero.Init its own (vocabulary x hidden) partition would be allocated first and held until garbage collection.
    While the model is built, that one Linear is created with a 1x1 weight instead (then tied)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)):
        yield
        return
    shape = (text.hidden_size, text.vocab_size)
    original = nn.Linear.__init__

    def init(self: nn.Linear, in_features: int, out_features: int, *args: Any, **kwargs: Any) -> None:
        if (in_features, out_features) != shape:
            original(self, in_features, out_features, *args, **kwargs)
            return
        original(self, 1, 1, *args, **kwargs)
        self.in_features, self.out_features = in_features, out_features

    nn.Linear.__init__ = init  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Linear.__init__ = original  # type: ignore[method-assign]


def _partition_only(init: Any, param: torch.Tensor) -> None:
    init._convert_to_deepspeed_param(param)
    param.partition()


def materialize_partitioned(model: nn.Module, folder: Path) -> dict[str, int]:
    """Fill the ZeRO-3 partition every rank holds of each parameter from the checkpoint: a parameter's partition is
    a contiguous range of its flattened elements, read as the rows of the stored tensor that cover it, a chunk at a
    time."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    reader = CheckpointReader(folder)
    tied = _tied_names(model)
    renamed = checkpoint_names(model, reader)
    counts = {"read": 0}
    try:
        seen: set[int] = set()
        for name, p in model.named_parameters():
            if id(p) in seen or not hasattr(p, "ds_tensor"):
                continue
            seen.add(id(p))
            key = checkpoint_key(name, reader, tied, renamed)
            if key is None:
                raise VrayError(f"model.source: {folder} has no tensor for parameter {name}")
            part = p.ds_tensor.ds_numel
            start = rank * part
            stop = min(start + part, p.ds_numel)
            with torch.no_grad():
                _fill_flat(p.ds_tensor.data.view(-1), reader, key, start, stop, list(p.ds_shape))
                if p.data.numel() == p.ds_numel:  # a small parameter ZeRO-3 keeps whole on every rank
                    _fill_flat(p.data.view(-1), reader, key, 0, p.ds_numel, list(p.ds_shape))
            counts["read"] += 1
    finally:
        reader.close()
    return counts


def _fill_flat(dst: torch.Tensor, reader: CheckpointReader, key: str, start: int, stop: int,
               full_shape: list[int]) -> None:
    """Copy flattened elements [start, stop) of checkpoint tensor `key` (in the model's layout) into dst[0:...],
    reading the rows that cover them at most LOAD_CHUNK_BYTES at a time: a ZeRO-3 partition (any element range)
    and an FSDP2 shard (whole rows) alike."""
    if stop <= start:
        return
    stored, transposed = _layout(reader, key, full_shape)
    row = max(1, math.prod(stored[1:]))
    step = max(1, LOAD_CHUNK_BYTES // (row * 4))
    first, last = start // row, -(-stop // row)
    for a in range(first, last, step):
        b = min(last, a + step)
        piece = reader.rows(key, a, b)
        if transposed:  # a fused expert tensor stored as [experts, out, in]
            piece = piece.transpose(1, 2)
        flat = piece.reshape(-1)
        lo, hi = max(start, a * row), min(stop, b * row)
        dst[lo - start:hi - start].copy_(flat[lo - a * row:hi - a * row])
        del piece, flat


def _layout(reader: CheckpointReader, key: str, full_shape: list[int]) -> tuple[list[int], bool]:
    """The stored shape of `key`, and whether it is a fused expert tensor stored as [experts, out, in] (the hub's
    layout) for a model that holds [experts, in, out]."""
    stored = reader.shape(key)
    if stored == full_shape:
        return stored, False
    if len(stored) == 3 and [stored[0], stored[2], stored[1]] == full_shape:
        return stored, True
    raise VrayError(f"model.source: {key} has shape {stored} in {reader.folder}, the model expects {full_shape}")


def is_on_meta(model: nn.Module) -> bool:
    """True while any parameter of the model has no storage yet."""
    return any(_local(p).device.type == "meta" for p in model.parameters())


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


class CheckpointReader:
    """Lazy, sliceable access to a checkpoint folder's safetensors tensors by name (one file or an index of shards)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = ["model.safetensors"]
        if not all((folder / f).exists() for f in files):
            raise VrayError(f"model.source: {folder} has no safetensors weights ({', '.join(files)}); sharded loading "
                            "reads safetensors only (re-save the checkpoint with save_pretrained(safe_serialization=True))")
        self._stack = ExitStack()
        self._where: dict[str, Any] = {}
        for f in files:
            handle = self._stack.enter_context(safe_open(str(folder / f), framework="pt"))
            for key in handle.keys():
                self._where[key] = handle
        self.folder = folder

    def close(self) -> None:
        self._stack.close()

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> list[int]:
        return list(self._where[key].get_slice(key).get_shape())

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of dimension 0 of a tensor, read from the file."""
        return self._where[key].get_slice(key)[start:stop]


def checkpoint_key(name: str, reader: CheckpointReader, tied: dict[str, str],
                   renamed: dict[str, str] | None = None) -> str | None:
    """The checkpoint tensor behind a (possibly peft-wrapped) model parameter name, or None. `renamed`: the names
    transformers renames on load (`checkpoint_names`), under their checkpoint keys."""
    bare = name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")
    for candidate in (bare, tied.get(bare), (renamed or {}).get(bare)):
        if candidate is not None and candidate in reader:
            return candidate
    return None


def _bare(name: str) -> str:
    return name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


def checkpoint_names(model: nn.Module, reader: CheckpointReader) -> dict[str, str]:
    """The checkpoint keys of the parameters the checkpoint does not hold under their own names, where transformers
    renames a key on load (NVILA-Lite's `vision_tower.vision_model.*`): the model's own conversion, reverted as
    `save_pretrained` does, in one pass over the missing names. A name whose conversion does more than rename
    (merges or splits tensors) gets no entry: such checkpoints must be in the model's own layout."""
    from transformers.core_model_loading import revert_weight_conversion

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    missing = {_bare(n): torch.empty(0) for n, _ in model.named_parameters() if _bare(n) not in reader}
    if not missing:
        return {}
    try:
        reverted = revert_weight_conversion(base, dict(missing))
    except Exception:  # noqa: BLE001 - a conversion that cannot run on placeholders: no renames to offer
        return {}
    by_tensor = {id(t): key for key, t in reverted.items()}
    return {name: by_tensor[id(t)] for name, t in missing.items() if id(t) in by_tensor}


def _tied_names(model: nn.Module) -> dict[str, str]:
    """Parameter names that share a tensor, each mapped to the other (a tied embedding and LM head)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    by_id: dict[int, list[str]] = {}
    for name, p in base.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    out: dict[str, str] = {}
    for names in by_id.values():
        for a in names:
            for b in names:
                if a != b:
                    out[a] = b
    return out


def _local_rows(p: torch.Tensor) -> tuple[int, int]:
    """(first global row, rows) of dimension 0 that this rank holds of parameter `p` (all of it when unsharded)."""
    if not hasattr(p, "device_mesh"):
        return 0, p.shape[0] if p.dim() else 1
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    if any(offset[d] != 0 or shape[d] != p.shape[d] for d in range(1, p.dim())):
        raise VrayError(f"sharded loading reads dimension-0 shards only; {tuple(p.placements)} is not one")
    return offset[0], shape[0]


def init_lora_(name: str, p: torch.Tensor, start: int, rows: int, seed: int) -> None:
    """peft's default LoRA initialisation for an adapter parameter this rank holds rows of: A Kaiming-uniform
    (a = sqrt(5)), B zero. The full matrix comes from a generator seeded by the run's seed and the parameter's name,
    so every rank computes the same matrix and keeps its rows."""
    local = _local(p)
    if "lora_B" in name:
        local.data.zero_()
        return
    import zlib

    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    full = torch.empty(p.shape, dtype=torch.float32)
    fan_in = full.shape[1] if full.dim() > 1 else full.shape[0]
    bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_ with a = sqrt(5): sqrt(6 / ((1 + 5) * fan_in))
    full.uniform_(-bound, bound, generator=generator)
    local.data.copy_(full[start:start + rows])


LORA_RNG = "_vray_lora_rng"  # the CPU random state just before LoRA was applied to a model built without weights


def _replayed_lora_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The initial values peft gave the LoRA adapters of Linear layers, recomputed: applying LoRA to a model on the
    meta device draws them from the CPU random stream and then moves them to meta, losing them. Replaying the same
    draws from the state saved before (`LORA_RNG`) gives the values a model built with weights would have had, as
    peft computes them (`nn.Linear` construction, then Kaiming-uniform A and zero B, rounded through the base
    layer's dtype as peft's move to it does). The stream is put back as it was after."""
    state = getattr(model, LORA_RNG, None)
    if state is None:
        return {}
    from peft.tuners.lora.layer import Linear as LoraLinear

    now = torch.get_rng_state()
    torch.set_rng_state(state)
    out: dict[str, torch.Tensor] = {}
    try:
        for name, module in model.named_modules():
            if not isinstance(module, LoraLinear):
                continue
            for adapter in module.lora_A:
                a = nn.Linear(module.in_features, module.r[adapter], bias=False)
                b = nn.Linear(module.r[adapter], module.out_features, bias=bool(module.lora_bias[adapter]))
                nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
                # peft moves a new adapter to its base layer's device and dtype, then upcasts it back to fp32
                stored = module.get_base_layer().weight.dtype
                out[f"{name}.lora_A.{adapter}.weight"] = a.weight.detach().to(stored).float()
                out[f"{name}.lora_B.{adapter}.weight"] = torch.zeros_like(b.weight)
                if b.bias is not None:
                    out[f"{name}.lora_B.{adapter}.bias"] = torch.zeros_like(b.bias)
    finally:
        torch.set_rng_state(now)
    return out


def materialize_sharded(model: nn.Module, folder: Path, device: torch.device, seed: int) -> dict[str, int]:
    """Give every meta parameter of a sharded (or plain) model its storage on `device` and fill it: base weights from
    the checkpoint's rows this rank owns, LoRA adapters with peft's initialisation. Buffers keep their values.
    Returns counts of what was read and initialised."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    tied = _tied_names(model)  # before storage is given: a copy per module would untie them
    model.to_empty(device=device)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if tied and not _tied_names(model) and hasattr(base, "tie_weights"):
        base.tie_weights()
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name in buffers:
                b.copy_(buffers[name])
    replayed = _replayed_lora_weights(model)
    reader = CheckpointReader(folder)
    renamed = checkpoint_names(model, reader)
    counts = {"read": 0, "adapters": 0}
    try:
        seen: set[int] = set()
        for name, p in model.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            start, rows = _local_rows(p)
            if name in replayed:
                with torch.no_grad():
                    _local(p).data.copy_(replayed[name][start:start + rows])
                counts["adapters"] += 1
                continue
            if "lora_A" in name or "lora_B" in name:  # adapters of other layer kinds (fused experts)
                init_lora_(name, p, start, rows, seed)
                counts["adapters"] += 1
                continue
            key = checkpoint_key(name, reader, tied, renamed)
            if key is None:
                raise VrayError(f"model.source: {folder} has no tensor for parameter {name}; sharded loading (fsdp2) "
                                "reads checkpoints in transformers' own layout: re-save it with save_pretrained, or "
                                "train it with a zero3 plan (cluster.strategy: zero3)")
            row = math.prod(p.shape[1:])
            with torch.no_grad():
                _fill_flat(_local(p).data.view(-1), reader, key, start * row, (start + rows) * row, list(p.shape))
            counts["read"] += 1
    finally:
        reader.close()
    return counts
