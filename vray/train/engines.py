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

    def _clip(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def step(self) -> float:
        """Clip, take an optimizer and scheduler step, zero the gradients; returns the gradient norm."""
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
    def save(self, folder: Path, processor: Any) -> None:
        """Write the weights in Hugging Face form (rank 0) and what a resume needs; called on every rank."""
        rank = world()[0]
        if rank == 0:
            self.model.save_pretrained(folder, safe_serialization=True)
            processor.save_pretrained(folder)
            torch.save({"optimizer": self.optimizer.state_dict()}, folder / "optimizer.pt")

    def load(self, folder: Path) -> None:
        """Restore trainable weights and optimizer state from a checkpoint written by `save`."""
        _load_adapter(self.model, folder)
        state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])


def _load_adapter(model: nn.Module, folder: Path) -> None:
    """Put a checkpoint's LoRA adapter into a peft model (full weights are loaded when the model is built)."""
    adapter = folder / "adapter_model.safetensors"
    if adapter.exists():
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(str(adapter)))


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

    def step(self) -> float:
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

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed would divide the loss by its gradient_accumulation_steps (not here: the loss is already this
        # micro-batch's share of the step) and averages the gradients over the data-parallel ranks, which the
        # factor undoes. It steps the optimizer only at the end of an accumulation window (a micro-step otherwise).
        self.ds.backward(loss * world()[1], scale_wrt_gas=False)
        self.ds.step()

    def step(self) -> float:
        self.scheduler.step()
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def save(self, folder: Path, processor: Any) -> None:
        rank = world()[0]
        self.ds.save_checkpoint(str(folder / "deepspeed"), tag="state", client_state={}, save_latest=False)
        is_peft = hasattr(self.model, "peft_config")
        if self.name.startswith("zero3"):
            if is_peft:
                import deepspeed

                params = [p for p in self.model.parameters() if p.requires_grad]
                with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                    if rank == 0:
                        self.model.save_pretrained(folder, safe_serialization=True)
            else:
                state = self.ds._zero3_consolidated_16bit_state_dict()  # collective: every rank takes part
                if rank == 0:
                    self.model.save_pretrained(folder, state_dict=state, safe_serialization=True)
        elif rank == 0:
            self.model.save_pretrained(folder, safe_serialization=True)
        if rank == 0:
            processor.save_pretrained(folder)

    def load(self, folder: Path) -> None:
        self.ds.load_checkpoint(str(folder / "deepspeed"), tag="state", load_optimizer_states=True,
                                load_lr_scheduler_states=False)

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

    def _state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        return {"model": get_model_state_dict(self.model), "optim": get_optimizer_state_dict(self.model, self.optimizer)}

    def save(self, folder: Path, processor: Any) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if world()[0] == 0:
            self.model.save_pretrained(folder, state_dict=full, safe_serialization=True)
            processor.save_pretrained(folder)
        dcp.save(self._state(), checkpoint_id=str(folder / "dcp"))

    def load(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        state = self._state()
        dcp.load(state, checkpoint_id=str(folder / "dcp"))
        set_model_state_dict(self.model, state["model"])
        set_optimizer_state_dict(self.model, self.optimizer, state["optim"])

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
