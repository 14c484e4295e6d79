"""Engines: what differs between distributed strategies, behind one interface the loop calls.

The loop reads top to bottom: `engine.module(**batch)`, `engine.backward(loss)`, `engine.step()`;
wrapping, gradient synchronisation, loss scaling, clipping, generation under sharding and what a checkpoint
holds live here. `ddp` is torch DistributedDataParallel; `zero1`, `zero2`, `zero3` and `zero3-offload` are
DeepSpeed ZeRO; `fsdp2` and `fsdp2-hybrid` are torch FSDP2 (`fully_shard` per decoder layer and per vision
block, bf16 compute over fp32 shards; hybrid shards within a node and replicates across nodes on a 2-D mesh).
Every engine runs in a plain torch.distributed process group as well as under Ray Train.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vray.errors import VrayError
from vray.models.loader import DTYPES
from vray.models.quantized import keep_4bit_layout
from vray.spec import DEEPSPEED_STRATEGIES, FSDP2_STRATEGIES, STRATEGIES


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of `values` over all ranks (identity in a single process)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over all ranks in place, on its device (no host sync); returns it."""
    if world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(value: int, device: torch.device) -> int:
    """The largest `value` over all ranks."""
    t = torch.tensor([value], dtype=torch.int64, device=device)
    if world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_reduce_min(value: int, device: torch.device) -> int:
    """The smallest `value` over all ranks."""
    t = torch.tensor([value], dtype=torch.int64, device=device)
    if world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def all_gather_names(names: list[str]) -> list[list[str]]:
    """Every rank's list of names (a rank's own only, in a single process)."""
    if world()[1] == 1:
        return [list(names)]
    out: list[Any] = [None] * world()[1]
    dist.all_gather_object(out, list(names))
    return out


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if world()[1] > 1:
        dist.barrier()


OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


@dataclass(frozen=True)
class Generating:
    """What evaluation runs on: the model, whether its forwards are collective (sharded weights gathered layer by
    layer: every rank must run the same forwards, `synced_gpus`), and how many whole-model gathers it took."""

    model: nn.Module
    synced: bool = False
    gathers: int = 0


def gather_fits(model_bytes: int, free_bytes: int) -> bool:
    """Whether a whole model of `model_bytes` (at the compute dtype) can be gathered on a GPU with `free_bytes` free,
    leaving room for generation's activations and cache (2 GiB or a tenth of the free memory, the larger)."""
    return model_bytes + max(2 << 30, free_bytes // 10) <= free_bytes


class Engine:
    """The interface every strategy implements."""

    name = "base"
    # Sharded weights are gathered inside every forward, so all ranks must run the same number of forwards
    # while generating (evaluation pads shards and generates the full number of new tokens).
    lockstep_generation = False

    def __init__(self, model: nn.Module, make_optimizer: OptimizerFactory, max_grad_norm: float, device: torch.device,
                 precision: str):
        self.model = model  # unwrapped: for saving and generation
        self.module: nn.Module = model  # what the loop calls forward on
        self.max_grad_norm = max_grad_norm
        self.device = device
        self.precision = precision
        self.optimizer = make_optimizer(model)
        self.scheduler: Any = None

    def attach_scheduler(self, make_scheduler: Callable[[torch.optim.Optimizer], Any]) -> None:
        """Create the learning-rate schedule on the engine's optimizer."""
        self.scheduler = make_scheduler(self.optimizer)

    # ---- one optimizer step ---------------------------------------------------------------------
    def no_sync(self, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        """Skip gradient synchronisation on accumulation micro-batches that do not end a step."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate this rank's share of the step's loss: the step's gradient is the sum over every rank and
        micro-batch of the gradients of their shares (`vray.train.loss`). Engines whose gradient reduction
        averages over ranks or accumulation steps scale the loss back up by as much."""
        loss.backward()

    def _clip(self) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def step(self) -> torch.Tensor:
        """Clip, take an optimizer and scheduler step, zero the gradients; returns the gradient norm, a tensor on
        the device (reading it with `float` waits for the step: the loop does not)."""
        norm = self._clip()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @contextlib.contextmanager
    def generation(self, gather: bool = True) -> Iterator[Generating]:
        """The model evaluation runs its forwards and `generate` on (never a DDP wrapper, whose forward takes part in
        collectives), and whether the ranks must run every forward together. Sharded engines gather the whole model
        once for the duration when `gather` (no forward then takes part in a collective); otherwise every forward
        gathers each layer, and ranks that run out of work keep stepping with the others (`synced`)."""
        yield Generating(self.model)

    # ---- checkpoints ----------------------------------------------------------------------------
    # A step checkpoint holds what a resume needs and nothing more: the trainable weights and their optimizer
    # states (a LoRA checkpoint: the adapter and its states, never the frozen base). final/ holds the weights in
    # Hugging Face form. A LoRA adapter is written in Hugging Face form in both: it is small and makes every
    # checkpoint servable.
    def save(self, folder: Path, processor: Any, final: bool = False) -> None:
        """Write this rank's part of a checkpoint (called on every rank): rank 0 writes the replicated weights in
        Hugging Face form and, for a step checkpoint, the optimizer state."""
        if world()[0] == 0:
            self.model.save_pretrained(folder, safe_serialization=True)
            processor.save_pretrained(folder)
            if not final:
                torch.save({"optimizer": self.optimizer.state_dict()}, folder / "optimizer.pt")

    def load(self, folder: Path, saved_world: int | None = None) -> None:
        """Restore trainable weights and optimizer state from a checkpoint written by `save` at `saved_world`
        ranks (full weights are loaded when the model is built). Replicated state: any world size."""
        _load_adapter(self.model, folder)
        state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def _load_adapter(model: nn.Module, folder: Path) -> None:
    """Put a checkpoint's LoRA adapter into a peft model (full weights are loaded when the model is built)."""
    adapter = folder / "adapter_model.safetensors"
    if adapter.exists():
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(str(adapter)))


LORA_OPTIMIZER = "lora_optimizer.pt"  # DeepSpeed LoRA: the optimizer states by parameter name, any world size
SHARD_BYTES = 2 * 1024**3  # Hugging Face weights stream out in safetensors shards of about this size


def _unit_of(name: str) -> str:
    """The repeated block a weight belongs to (`...layers.7`), so one shard never splits a layer's weights."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    return name


def write_hf_weights(model: nn.Module, folder: Path, tensors: Iterator[tuple[str, torch.Tensor | None]],
                     shard_bytes: int = SHARD_BYTES) -> None:
    """Rank 0 writes a full model's Hugging Face checkpoint (config, safetensors shards and their index) from
    (name, full tensor) pairs gathered one at a time: no rank ever holds more than one shard of the model.

    Every rank iterates `tensors` (gathering is collective); ranks other than 0 yield None and write nothing.
    The weights are written in the checkpoint's original layout (`revert_weight_conversion` per shard; a shard
    holds whole layers)."""
    import json

    from safetensors.torch import save_file
    from transformers.core_model_loading import revert_weight_conversion

    rank = world()[0]
    current: dict[str, torch.Tensor] = {}
    size, unit, written = 0, None, []
    weight_map: dict[str, str] = {}
    total = 0

    def flush() -> None:
        nonlocal current, size
        if current:
            index = len(written) + 1
            name = f"model-{index:05d}.safetensors"
            state = revert_weight_conversion(model, current)
            save_file({k: v.contiguous() for k, v in state.items()}, str(folder / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in state})
            written.append(name)
        current, size = {}, 0

    for name, tensor in tensors:
        if rank != 0 or tensor is None:
            continue
        if size >= shard_bytes and _unit_of(name) != unit:
            flush()
        unit = _unit_of(name)
        current[name] = tensor
        size += tensor.numel() * tensor.element_size()
        total += tensor.numel()
    if rank != 0:
        return
    flush()
    if len(written) == 1:
        (folder / written[0]).rename(folder / "model.safetensors")
    else:
        renamed = {}
        for i, name in enumerate(written, start=1):
            final = f"model-{i:05d}-of-{len(written):05d}.safetensors"
            (folder / name).rename(folder / final)
            renamed[name] = final
        index = {"metadata": {"total_parameters": total}, "weight_map": {k: renamed[v] for k, v in weight_map.items()}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


def _frozen_names(model: nn.Module) -> set[str]:
    """Every state-dict name of a frozen parameter, aliases included: a tied output head that shares a frozen
    embedding is the embedding, and a lean checkpoint holds neither."""
    return {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def _tied_names(model: nn.Module) -> set[str]:
    """Names of weights that are another weight (tied embeddings): written once, under the first name."""
    seen: dict[int, str] = {}
    tied = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        else:
            seen[id(param)] = name
    return tied


class DDPEngine(Engine):
    """Data parallel with replicated weights: DistributedDataParallel (gloo on CPU, NCCL on GPU); fp16 with a
    gradient scaler."""

    name = "ddp"

    def __init__(self, model: nn.Module, make_optimizer: OptimizerFactory, max_grad_norm: float, device: torch.device,
                 precision: str):
        super().__init__(model, make_optimizer, max_grad_norm, device, precision)
        if world()[1] > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            # Gradients live in the communication buckets: no second copy of them.
            self.module = DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "Float16" and device.type == "cuda")

    def no_sync(self, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        if last_micro_batch or not hasattr(self.module, "no_sync"):
            return contextlib.nullcontext()
        return self.module.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        # DistributedDataParallel averages the gradients over the ranks; accumulation under no_sync sums them.
        self.scaler.scale(loss * world()[1]).backward()

    def step(self) -> torch.Tensor:
        self.scaler.unscale_(self.optimizer)
        norm = self._clip()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO stage 1, 2 or 3 (3 with parameters and optimizer states offloaded to CPU memory)."""

    def __init__(self, model: nn.Module, make_optimizer: OptimizerFactory, max_grad_norm: float, device: torch.device,
                 precision: str, config: dict[str, Any], strategy: str):
        import deepspeed

        self.name = strategy
        self.lockstep_generation = strategy.startswith("zero3")
        config = dict(config)
        config.setdefault("zero_allow_untested_optimizer", True)
        if strategy == "zero3-offload":
            config["zero_force_ds_cpu_optimizer"] = False  # the spec's torch optimizer, stepped on the CPU
        if self.lockstep_generation:
            mark_moe_leaves(model)
        super().__init__(model, make_optimizer, max_grad_norm, device, precision)
        # DeepSpeed wraps the torch optimizer and keeps its parameter groups: the schedule stays on the torch one.
        self.ds, self.ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=config,
                                                                dist_init_required=False)
        self.module = self.ds
        self.model = self.ds.module
        # The HfDeepSpeedConfig a ZeRO-3 model was built under has done its work: while it lives, transformers
        # builds every model of this process under zero.Init.
        for module in self.model.modules():
            module.__dict__.pop("_vray_zero3_config", None)
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()

    def no_sync(self, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        """The step ends where the loop says (packed steps vary in micro-batches), not at DeepSpeed's
        gradient_accumulation_steps count: its reductions and optimizer step follow this boundary."""
        self.ds.set_gradient_accumulation_boundary(last_micro_batch)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed would divide the loss by its gradient_accumulation_steps (not here: the loss is already this
        # micro-batch's share of the step) and averages the gradients over the data-parallel ranks, which the
        # factor undoes. It steps the optimizer only at the end of an accumulation window (a micro-step otherwise).
        self.ds.backward(loss * world()[1], scale_wrt_gas=False)
        self.ds.step()

    def step(self) -> torch.Tensor:
        self.scheduler.step()
        norm = self.ds.get_global_grad_norm()
        return torch.as_tensor(norm if norm is not None else 0.0)

    # A LoRA checkpoint holds the adapter (fp32 master weights, Hugging Face form) and its optimizer states twice
    # over: DeepSpeed's own files for a resume at the same world size, and one world-size-independent file
    # (`lora_optimizer.pt`, the full states per parameter name) for a resume at any other. Both are small.
    def save(self, folder: Path, processor: Any, final: bool = False) -> None:
        rank = world()[0]
        peft = _is_peft(self.model)
        if peft:
            weights, optimizer = self._lora_state()  # collective: every rank takes part
            if rank == 0:
                self.model.save_pretrained(folder, state_dict=weights, safe_serialization=True)
                if not final:
                    torch.save(optimizer, folder / LORA_OPTIMIZER)
        elif final:
            self._save_full_weights(folder)
        if not final:
            self._exclude_tied_frozen()
            self.ds.save_checkpoint(str(folder / "deepspeed"), tag="state", client_state={}, save_latest=False,
                                    exclude_frozen_parameters=True)
        if rank == 0:
            processor.save_pretrained(folder)

    def _exclude_tied_frozen(self) -> None:
        """DeepSpeed's `exclude_frozen_parameters` drops each frozen parameter under one name; a tied alias (an
        output head sharing the frozen embedding) would still be saved. Its module state leaves those out too."""
        import deepspeed

        if getattr(self.ds, "_vray_lean_states", False):
            return
        frozen = _frozen_names(self.model)

        def module_state_dict(*args: Any, **kwargs: Any) -> dict[str, Any]:
            state = deepspeed.DeepSpeedEngine.module_state_dict(self.ds, *args, **kwargs)
            if kwargs.get("exclude_frozen_parameters"):
                state = type(state)((k, v) for k, v in state.items() if k not in frozen)
            return state

        self.ds.module_state_dict = module_state_dict
        self.ds._vray_lean_states = True

    def _save_full_weights(self, folder: Path) -> None:
        """final/ of full fine-tuning: stages 1 and 2 replicate the 16-bit weights (rank 0 writes its own); stage 3
        gathers one parameter at a time into the streamed shards."""
        if not self.name.startswith("zero3"):
            if world()[0] == 0:
                self.model.save_pretrained(folder, safe_serialization=True)
            return
        import deepspeed

        tied = _tied_names(self.model)

        def gathered() -> Iterator[tuple[str, torch.Tensor | None]]:
            for name, param in self.model.named_parameters():
                if name in tied:
                    continue
                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    yield name, param.detach().to("cpu", copy=True) if world()[0] == 0 else None
            for name, buffer in self.model.named_buffers():
                if world()[0] == 0 and name in self.model.state_dict():
                    yield name, buffer.detach().to("cpu", copy=True)

        write_hf_weights(self.model, folder, gathered())

    def _base_optimizer(self) -> torch.optim.Optimizer:
        return self.ds_optimizer.optimizer

    def _flats(self) -> list[tuple[int, torch.Tensor]]:
        """(parameter group, flat fp32 partition) pairs the torch optimizer steps: one per group under ZeRO-1/2;
        under ZeRO-3 one per sub-group, put into its group only while it steps."""
        zero3 = getattr(self.ds_optimizer, "fp32_partitioned_groups_flat", None)
        if zero3 is not None:
            return [(self.ds_optimizer.sub_group_to_group_id[i], flat) for i, flat in enumerate(zero3)]
        return [(i, g["params"][0]) for i, g in enumerate(self._base_optimizer().param_groups) if g["params"]]

    def _lora_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The adapter's fp32 master weights, and the optimizer file (those weights and the full optimizer states by
        parameter name), assembled from every rank's partitions (collective; only rank 0 keeps them)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        base = self._base_optimizer()
        flat = next((f for _, f in self._flats() if f in base.state), None)
        state = base.state[flat] if flat is not None else {}
        keys = sorted(k for k, v in state.items() if torch.is_tensor(v) and v.shape == flat.shape)
        scalars = {k: v for k, v in state.items() if k not in keys}
        rank0 = world()[0] == 0
        weights: dict[str, torch.Tensor] = {}
        states: dict[str, dict[str, torch.Tensor]] = {}
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            w = safe_get_full_fp32_param(param)
            moments = {k: safe_get_full_optimizer_state(param, k) for k in keys}
            if rank0:
                weights[name] = w.detach().cpu().clone()
                states[name] = {k: v.detach().cpu().clone() for k, v in moments.items()}
        groups = [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]
        return weights, {"weights": weights, "states": states, "scalars": scalars, "param_groups": groups,
                         "world_size": world()[1]}

    def load(self, folder: Path, saved_world: int | None = None) -> None:
        if saved_world is None or saved_world == world()[1]:
            self.ds.load_checkpoint(str(folder / "deepspeed"), tag="state", load_module_strict=False,
                                    load_optimizer_states=True, load_lr_scheduler_states=False)
            return
        if not _is_peft(self.model):
            raise VrayError(
                f"{folder} was written by {saved_world} ranks and this run has {world()[1]}: DeepSpeed ZeRO cannot "
                "repartition a full fine-tuning checkpoint's optimizer states. Resume with "
                f"cluster.workers: {saved_world}, or convert it to a universal checkpoint with DeepSpeed's "
                "ds_to_universal.py (python -m deepspeed.checkpoint.ds_to_universal) and resume from that")
        self._load_lora_state(folder)

    def _load_lora_state(self, folder: Path) -> None:
        """Resume a LoRA checkpoint at another world size: the adapter's fp32 masters and the optimizer states are
        put back into this world's partitions from their world-size-independent files."""
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        saved = torch.load(folder / LORA_OPTIMIZER, map_location="cpu", weights_only=False)
        named = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        weights = saved["weights"]
        missing = set(named) - set(weights)
        if missing:
            raise VrayError(f"{folder}: {LORA_OPTIMIZER} lacks {len(missing)} trainable weight(s), e.g. "
                            f"{sorted(missing)[0]}; was it written by another model or LoRA selection?")
        base = self._base_optimizer()
        # The optimizer's per-partition state is created by its first step: take one with zero gradients and a
        # zero learning rate (nothing moves), then overwrite every state with the saved one.
        for group_index, flat in self._flats():
            group = base.param_groups[group_index]
            params, lr = group["params"], group["lr"]
            group["params"], group["lr"] = [flat], 0.0
            flat.grad = torch.zeros_like(flat)
            base.step()
            flat.grad = None
            group["params"], group["lr"] = params, lr
            for k, v in saved["scalars"].items():
                base.state[flat][k] = v.clone() if torch.is_tensor(v) else v
        if not self.name.startswith("zero3"):
            from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

            lp_groups = getattr(self.ds_optimizer, "bit16_groups", None) or self.ds_optimizer.bf16_groups
            for group_index, flat in self._flats():
                lazy_init_hp_params_optimizer_state(lp_groups[group_index], flat, base.state)
        for name, param in named.items():
            value = weights[name].to(torch.float32)
            safe_set_full_fp32_param(param, value.to(self.device))
            for k, moment in saved["states"][name].items():
                safe_set_full_optimizer_state(param, moment.to(self.device), k)
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if world()[0] == 0 or not self.name.startswith("zero3"):
                    param.data.copy_(value.to(param.dtype))

    @contextlib.contextmanager
    def generation(self, gather: bool = True) -> Iterator[Generating]:
        sharded = self.lockstep_generation and world()[1] > 1
        offload = getattr(getattr(self.ds, "optimizer", None), "parameter_offload", None)
        if not sharded or not gather or not _zero3_hooks_replaceable(offload):
            yield Generating(self.model, synced=sharded)
            return
        import deepspeed

        # Gathered once; ZeRO-3's module hooks would release (and gather again) every layer after its forward, and
        # its start-of-forward hook compares traces across ranks: both are off while the whole model is here.
        with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None):
            _remove_zero3_hooks(offload)
            try:
                yield Generating(self.model, synced=False, gathers=1)
            finally:
                _restore_zero3_hooks(offload)


def mark_moe_leaves(model: nn.Module) -> list[nn.Module]:
    """Under ZeRO-3, each sparse-MoE block is gathered and released as one leaf: its router picks different experts
    on every rank and every pass, so hooks on the experts inside it would fetch in an order no two ranks share."""
    classes = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.endswith("SparseMoeBlock")})
    if not classes:
        return []
    from deepspeed.utils import set_z3_leaf_modules

    return set_z3_leaf_modules(model, classes)


class FSDP2Engine(Engine):
    """torch FSDP2: `fully_shard` on every decoder layer, every vision block and the root; bf16 (or fp16 / fp32)
    compute over fp32 shards, fp32 gradient reduction. Hybrid: a (nodes, GPUs per node) mesh that shards within
    a node and replicates across nodes."""

    lockstep_generation = True

    def __init__(self, model: nn.Module, make_optimizer: OptimizerFactory, max_grad_norm: float, device: torch.device,
                 precision: str, units: list[nn.Module | list[nn.Module]], mesh_shape: list[int], strategy: str,
                 materialize: Callable[[nn.Module], Any] | None = None):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from vray.models.sharded import is_on_meta

        self.name = strategy
        if any(type(p).__name__ == "Params4bit" for p in model.parameters()):
            raise VrayError("fsdp2 does not shard 4-bit (QLoRA) weights; QLoRA runs with the ddp engine")
        if precision == "Float16":
            raise VrayError("compute.precisionType: Float16 needs loss scaling, which vray runs with ddp and DeepSpeed; "
                            "use BFloat16 with fsdp2")
        world_size = world()[1]
        if math.prod(mesh_shape) != world_size:
            raise VrayError(f"plan.fsdp.mesh {list(mesh_shape)} does not cover the {world_size} workers; re-plan the run "
                            "(fsdp2-hybrid needs a whole number of nodes' worth of workers)")
        names = ("replicate", "shard") if len(mesh_shape) == 2 else ("shard",)
        mesh = init_device_mesh(device.type, tuple(mesh_shape), mesh_dim_names=names)
        policy = MixedPrecisionPolicy(param_dtype=DTYPES[precision], reduce_dtype=torch.float32)
        for unit in units:
            fully_shard(unit, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        if is_on_meta(model):  # built without weights: each rank now reads the rows it owns
            if materialize is None:
                raise VrayError("fsdp2: the model was built without weights and nothing loads them")
            materialize(model)
        super().__init__(model, make_optimizer, max_grad_norm, device, precision)  # the optimizer sees the shards

    def no_sync(self, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        """Every micro-batch reduce-scatters its gradients (FSDP2's default), so they stay sharded between
        micro-batches: skipping that sync would keep a whole unsharded gradient per rank until the step ends.
        Hybrid skips only the all-reduce across the replicas (nodes) on micro-batches that do not end a step."""
        if self.name != "fsdp2-hybrid" or last_micro_batch:
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def all_reduce_only_at_the_end() -> Iterator[None]:
            self.model.set_requires_all_reduce(False)
            try:
                yield
            finally:
                self.model.set_requires_all_reduce(True)

        return all_reduce_only_at_the_end()

    def backward(self, loss: torch.Tensor) -> None:
        # FSDP2 divides the reduced gradients by the data-parallel size (shards x replicas): the factor undoes it.
        loss.mul(world()[1]).backward()

    # A step checkpoint is DCP of the trainable parameters and their optimizer states, each rank writing its own
    # shards: no gather. DCP reshards on load, so it resumes at any world size or mesh. final/ streams the
    # weights to rank 0 one parameter at a time (the adapter alone for LoRA).
    def _state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        trainable = StateDictOptions(ignore_frozen_params=True)
        frozen = _frozen_names(self.model)  # tied aliases of frozen weights included
        model = {k: v for k, v in get_model_state_dict(self.model, options=trainable).items() if k not in frozen}
        return {"model": model, "optim": get_optimizer_state_dict(self.model, self.optimizer, options=trainable)}

    def _gathered(self, trainable_only: bool) -> Iterator[tuple[str, torch.Tensor | None]]:
        """(name, full tensor on rank 0's CPU) for each weight, one at a time: every rank takes part in each gather."""
        from torch.distributed.tensor import DTensor

        rank0 = world()[0] == 0
        tied = _tied_names(self.model)
        for name, param in self.model.named_parameters():
            if name in tied or (trainable_only and not param.requires_grad):
                continue
            full = param.full_tensor() if isinstance(param, DTensor) else param
            yield name, full.detach().to("cpu", copy=True) if rank0 else None
            del full
        if not trainable_only:
            names = set(self.model.state_dict())
            for name, buffer in self.model.named_buffers():
                if name in names:
                    yield name, buffer.detach().to("cpu", copy=True) if rank0 else None

    def save(self, folder: Path, processor: Any, final: bool = False) -> None:
        import torch.distributed.checkpoint as dcp

        rank = world()[0]
        if _is_peft(self.model):
            adapter = {name: t for name, t in self._gathered(trainable_only=True) if t is not None}
            if rank == 0:
                self.model.save_pretrained(folder, state_dict=adapter, safe_serialization=True)
        elif final:
            write_hf_weights(self.model, folder, self._gathered(trainable_only=False))
        if rank == 0:
            processor.save_pretrained(folder)
        if not final:
            dcp.save(self._state(), checkpoint_id=str(folder / "dcp"))

    def load(self, folder: Path, saved_world: int | None = None) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        state = self._state()
        dcp.load(state, checkpoint_id=str(folder / "dcp"))  # each rank reads the slices of its own shards
        options = StateDictOptions(ignore_frozen_params=True, strict=False)
        set_model_state_dict(self.model, state["model"], options=options)
        set_optimizer_state_dict(self.model, self.optimizer, state["optim"], options=options)

    @contextlib.contextmanager
    def generation(self, gather: bool = True) -> Iterator[Generating]:
        from torch.distributed.fsdp import FSDPModule

        sharded = world()[1] > 1
        units = [m for m in self.model.modules() if isinstance(m, FSDPModule)]
        settings = _fsdp2_reshard_settings(self.model, units) if sharded and gather else None
        if settings is None:
            yield Generating(self.model, synced=sharded)
            return
        # Every unit all-gathered once, and kept through every forward until the end (no reshard after forward).
        self.model.set_reshard_after_forward(False)
        for unit in units:
            unit.unshard()
        try:
            yield Generating(self.model, synced=False, gathers=1)
        finally:
            for unit in units:
                unit.reshard()
            _restore_fsdp2_reshard_settings(settings)


def _zero3_hooks_replaceable(offload: Any) -> bool:
    return all(hasattr(offload, a) for a in ("_remove_module_hooks", "setup_zero_stage3_hooks", "forward_hooks",
                                             "backward_hooks", "module"))


def _remove_zero3_hooks(offload: Any) -> None:
    """Take ZeRO-3's parameter hooks off the model (DeepSpeed's own teardown of them)."""
    offload._remove_module_hooks()
    offload.forward_hooks, offload.backward_hooks = [], []
    for p in offload.module.parameters():
        if hasattr(p, "ds_active_sub_modules"):
            p.ds_active_sub_modules.clear()


def _restore_zero3_hooks(offload: Any) -> None:
    """Put ZeRO-3's hooks back as DeepSpeed sets them up; the next forward records its trace again."""
    from deepspeed.runtime.zero import parameter_offload

    offload.setup_zero_stage3_hooks()
    stack = parameter_offload.FWD_MODULE_STACK
    if len(stack) >= 2 and stack[-1] is offload.module and stack[-2] is offload.module:
        stack.pop()  # the set-up pushes the root again


def _fsdp2_reshard_settings(root: nn.Module, units: list[nn.Module]) -> list[tuple[Any, Any, list[Any]]] | None:
    """Each FSDP2 state's reshard-after-forward settings (to put back after evaluation), the root initialised first
    so that its own setting is the one training uses; None when this torch keeps them elsewhere."""
    states = [unit._get_fsdp_state() for unit in units]
    root_state = root._get_fsdp_state()
    if not hasattr(root_state, "_lazy_init") or not all(
            hasattr(s, "_auto_reshard_after_forward") and all(hasattr(g, "post_forward_mesh_info")
                                                              for g in s._fsdp_param_groups) for s in states):
        return None
    root_state._lazy_init()  # what the first forward does: the root keeps its weights after forward
    return [(s, s._auto_reshard_after_forward, [g.post_forward_mesh_info for g in s._fsdp_param_groups])
            for s in states]


def _restore_fsdp2_reshard_settings(settings: list[tuple[Any, Any, list[Any]]]) -> None:
    for state, auto, infos in settings:
        state._auto_reshard_after_forward = auto
        for group, info in zip(state._fsdp_param_groups, infos):
            group.post_forward_mesh_info = info


def shard_units(model: nn.Module, lm_prefix: str, vision_modules: tuple[str, ...]) -> list[nn.Module | list[nn.Module]]:
    """The modules FSDP2 shards one by one: the language model's decoder layers, the vision blocks, and the input
    embedding and LM head (one unit together when they share their weight), so the root keeps only small modules."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    units: list[nn.Module | list[nn.Module]] = list(base.get_submodule(f"{lm_prefix}.layers"))
    for prefix in vision_modules:
        try:
            tower = base.get_submodule(prefix)
        except AttributeError:
            continue
        lists = [m for m in tower.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
        if lists:
            units += list(max(lists, key=len))  # the blocks (the deepest repeated stack)
    embed = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if embed is not None and head is not None and head.weight is embed.weight:
        units.append([embed, head])
    else:
        units += [m for m in (embed, head) if m is not None]
    return units


def build_engine(strategy: str, model: nn.Module, make_optimizer: OptimizerFactory, max_grad_norm: float,
                 device: torch.device, precision: str, *, deepspeed_config: dict[str, Any] | None = None,
                 fsdp: dict[str, Any] | None = None, units: list[nn.Module | list[nn.Module]] | None = None,
                 materialize: Callable[[nn.Module], Any] | None = None) -> Engine:
    """The engine for a plan's strategy."""
    if strategy == "ddp":
        return DDPEngine(model, make_optimizer, max_grad_norm, device, precision)
    if strategy in DEEPSPEED_STRATEGIES:
        if deepspeed_config is None:
            raise VrayError(f"plan.strategy {strategy} needs the plan's DeepSpeed config")
        return DeepSpeedEngine(model, make_optimizer, max_grad_norm, device, precision, deepspeed_config, strategy)
    if strategy in FSDP2_STRATEGIES:
        shape = (fsdp or {}).get("mesh") or [world()[1]]
        return FSDP2Engine(model, make_optimizer, max_grad_norm, device, precision, units or [], list(shape), strategy,
                           materialize)
    raise VrayError(f"plan.strategy: '{strategy}' is not an engine; engines: {', '.join(STRATEGIES)}")


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients for the duration, then back to train mode. 4-bit layers keep the layout training
    reads: bitsandbytes would otherwise repack them for CPU inference here (vray.models.quantized)."""
    keep_4bit_layout(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
