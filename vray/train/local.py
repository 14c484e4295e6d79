"""Run the per-worker code in a plain torch.distributed process group, without Ray: N local processes (gloo on
CPU, NCCL on GPU). The engine tests and the GPU benchmarks use it.

One process group serves several runs in turn (a cell of the engine matrix each), so the processes and their
imports are paid for once. With `keep_going`, a run that fails on any rank fails alone: every rank records its
outcome in a folder the parent reads, the failing rank's process exits (its peers, possibly blocked in a
collective with it, are ended with it), and a fresh process group carries on with the runs after it. A failed run
leaves nothing behind for the next one: no half-torn process group, no DeepSpeed or FSDP2 state of its own.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

Entry = Callable[[dict[str, Any]], Any]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_worker(config: dict[str, Any]) -> Any:
    from vray.train.loop import train_worker

    return train_worker(config)


def _record(outcomes: str | None, index: int, rank: int, record: dict[str, Any]) -> None:
    if outcomes is not None:
        path = Path(outcomes) / f"{index}-rank{rank}.json"
        path.write_text(json.dumps({"time": time.time(), **record}))


def _worker(rank: int, world: int, port: int, configs: list[dict[str, Any]], backend: str, first: int,
            outcomes: str | None, entry: Entry) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        for index in range(first, len(configs)):  # one process group serves several runs in turn
            try:
                entry(configs[index])
                dist.barrier()  # every rank finished this run before any starts the next
            except BaseException:
                _record(outcomes, index, rank, {"ok": False, "error": traceback.format_exc()})
                raise
            _record(outcomes, index, rank, {"ok": True})
    finally:
        dist.destroy_process_group()


@dataclass
class RunOutcome:
    """How one run of `run_workers` ended: on every rank, or with the tracebacks of the ranks that failed."""

    index: int
    ok: bool
    errors: dict[int, str] = field(default_factory=dict)  # rank -> traceback, the first to fail first

    def report(self) -> str:
        """The failing ranks' tracebacks, the first failure first (the others are usually its consequence)."""
        if self.ok:
            return "ok"
        return "\n".join(f"--- rank {rank} ---\n{text}" for rank, text in self.errors.items())


def _read_outcome(folder: Path, index: int, world: int, failure: BaseException | None) -> RunOutcome:
    records = {}
    for rank in range(world):
        path = folder / f"{index}-rank{rank}.json"
        if path.exists():
            records[rank] = json.loads(path.read_text())
    if len(records) == world and all(r["ok"] for r in records.values()):
        return RunOutcome(index, True)
    failed = sorted((r for r in records.items() if not r[1]["ok"]), key=lambda item: item[1]["time"])
    errors = {rank: r["error"] for rank, r in failed}
    if not errors:  # no rank got to say why (a crash or a kill): what the process context saw
        errors = {-1: f"{type(failure).__name__}: {failure}"}
    return RunOutcome(index, False, errors)


def run_workers(config: dict[str, Any] | list[dict[str, Any]], world: int, backend: str = "gloo",
                keep_going: bool = False, entry: Entry = _train_worker) -> list[RunOutcome]:
    """Train with `world` local processes (several runs one after the other when given a list).

    Without `keep_going`, the first failing run raises with its traceback (the rank that failed first, not a peer
    that lost its connection to it). With it, every run is attempted and the outcome of each is returned in order;
    the processes are started again only after a failure. `entry` is what each rank runs for a config (the
    training worker; a picklable module-level function)."""
    configs = config if isinstance(config, list) else [config]
    outcomes: list[RunOutcome] = []
    with tempfile.TemporaryDirectory(prefix="vray-workers-") as folder:
        while len(outcomes) < len(configs):
            first = len(outcomes)
            failure: BaseException | None = None
            try:
                mp.start_processes(_worker, args=(world, _free_port(), configs, backend, first, folder, entry),
                                   nprocs=world, join=True, start_method="spawn")
            except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
                failure = exc
            for index in range(first, len(configs)):
                outcome = _read_outcome(Path(folder), index, world, failure)
                outcomes.append(outcome)
                if not outcome.ok:
                    break  # the runs after it start again in fresh processes
            if not outcomes[-1].ok:
                if failure is None:
                    raise RuntimeError(f"run {outcomes[-1].index} failed but every process exited cleanly")
                if not keep_going:
                    raise RuntimeError(f"run {outcomes[-1].index} of {len(configs)} failed:\n"
                                       f"{outcomes[-1].report()}") from failure
    return outcomes
