"""Run the per-worker code in a plain torch.distributed process group, without Ray: N local processes (gloo on
CPU, NCCL on GPU). The engine tests and the GPU benchmarks use it."""

from __future__ import annotations

import os
import socket
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, configs: list[dict[str, Any]], backend: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        from vray.train.loop import train_worker

        for config in configs:  # one process group serves several runs in turn
            train_worker(config)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def run_workers(config: dict[str, Any] | list[dict[str, Any]], world: int, backend: str = "gloo") -> None:
    """Train with `world` local processes (several runs one after the other when given a list); raises when one of
    them fails, with its traceback."""
    configs = config if isinstance(config, list) else [config]
    mp.start_processes(_worker, args=(world, _free_port(), configs, backend), nprocs=world, join=True,
                       start_method="spawn")
