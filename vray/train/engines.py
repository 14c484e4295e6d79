"""Engines: what differs between distributed strategies, behind one interface the loop calls.

The loop reads top to bottom: `engine.forward_module(batch)`, `engine.backward(loss)`, `engine.step()`;
wrapping, gradient synchronisation, clipping and what a checkpoint holds live here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


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


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if world()[1] > 1:
        dist.barrier()


class Engine:
    """The interface every strategy implements."""

    name = "base"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, max_grad_norm: float):
        self.model = model  # unwrapped: for saving, loading and generation
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.max_grad_norm = max_grad_norm
        self.module: nn.Module = model  # what the loop calls forward on

    def no_sync(self, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        """Skip gradient synchronisation on accumulation micro-batches that do not end a step."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate a (already accumulation-scaled) loss."""
        loss.backward()

    def step(self) -> float:
        """Clip, take an optimizer and scheduler step, zero the gradients; returns the gradient norm."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def training_state(self) -> dict[str, Any]:
        """Optimizer and scheduler state to checkpoint."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Restore what `training_state` returned."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def saves_on_this_rank(self) -> bool:
        """Whether this rank writes the checkpoint (replicated state: rank 0 only)."""
        return world()[0] == 0


class DDPEngine(Engine):
    """Data parallel with replicated weights: torch DistributedDataParallel (gloo on CPU, NCCL on GPU)."""

    name = "ddp"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, max_grad_norm: float,
                 device: torch.device):
        super().__init__(model, optimizer, scheduler, max_grad_norm)
        if world()[1] > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            # Gradients live in the communication buckets: no second copy of them.
            self.module = DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)

    def no_sync(self, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        if last_micro_batch or not hasattr(self.module, "no_sync"):
            return contextlib.nullcontext()
        return self.module.no_sync()


ENGINES = ("ddp",)


def build_engine(strategy: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 max_grad_norm: float, device: torch.device) -> Engine:
    """The engine for a plan's strategy."""
    if strategy == "ddp":
        return DDPEngine(model, optimizer, scheduler, max_grad_norm, device)
    from vray.errors import VrayError

    raise VrayError(f"plan.strategy: '{strategy}' has no engine in this version; the CPU planner uses ddp")


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients for the duration, then back to train mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
