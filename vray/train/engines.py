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
from collections.abc import Callable, Iterator
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


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if world()[1] > 1:
        dist.barrier()


OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


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
    def generation(self) -> Iterator[nn.Module]:
        """The model to call `generate` on."""
        yield self.model

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


class FSDP2Engine(Engine):
    """torch FSDP2: `fully_shard` on every decoder layer, every vision block and the root; bf16 (or fp16 / fp32)
    compute over fp32 shards, fp32 gradient reduction. Hybrid: a (nodes, GPUs per node) mesh that shards within
    a node and replicates across nodes."""

    lockstep_generation = True

    def __init__(self, model: nn.Module, make_optimizer: OptimizerFactory, max_grad_norm: float, device: torch.device,
                 precision: str, units: list[nn.Module], mesh_shape: list[int], strategy: str):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.name = strategy
        if any(type(p).__name__ == "Params4bit" for p in model.parameters()):
            raise VrayError("fsdp2 does not shard 4-bit (QLoRA) weights; QLoRA runs with the ddp engine")
        if precision == "Float16":
            raise VrayError("compute.precisionType: Float16 needs loss scaling, which vray runs with ddp and DeepSpeed; "
                            "use BFloat16 with fsdp2")
        names = ("replicate", "shard") if len(mesh_shape) == 2 else ("shard",)
        mesh = init_device_mesh(device.type, tuple(mesh_shape), mesh_dim_names=names)
        policy = MixedPrecisionPolicy(param_dtype=DTYPES[precision], reduce_dtype=torch.float32)
        for unit in units:
            fully_shard(unit, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
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


def shard_units(model: nn.Module, lm_prefix: str, vision_modules: tuple[str, ...]) -> list[nn.Module]:
    """The modules FSDP2 shards one by one: the language model's decoder layers and the vision blocks."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    units: list[nn.Module] = list(base.get_submodule(f"{lm_prefix}.layers"))
    for prefix in vision_modules:
        try:
            tower = base.get_submodule(prefix)
        except AttributeError:
            continue
        lists = [m for m in tower.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
        if lists:
            units += list(max(lists, key=len))  # the blocks (the deepest repeated stack)
    return units


def build_engine(strategy: str, model: nn.Module, make_optimizer: OptimizerFactory, max_grad_norm: float,
                 device: torch.device, precision: str, *, deepspeed_config: dict[str, Any] | None = None,
                 fsdp: dict[str, Any] | None = None, units: list[nn.Module] | None = None) -> Engine:
    """The engine for a plan's strategy."""
    if strategy == "ddp":
        return DDPEngine(model, make_optimizer, max_grad_norm, device, precision)
    if strategy in DEEPSPEED_STRATEGIES:
        if deepspeed_config is None:
            raise VrayError(f"plan.strategy {strategy} needs the plan's DeepSpeed config")
        return DeepSpeedEngine(model, make_optimizer, max_grad_norm, device, precision, deepspeed_config, strategy)
    if strategy in FSDP2_STRATEGIES:
        shape = (fsdp or {}).get("mesh") or [world()[1]]
        return FSDP2Engine(model, make_optimizer, max_grad_norm, device, precision, units or [], list(shape), strategy)
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
