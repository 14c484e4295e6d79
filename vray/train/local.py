"""Run the per-worker code in a plain torch.distributed process group, without Ray: N local processes (gloo on
CPU, NCCL on GPU). The engine tests and the GPU benchmarks use it.

One process group serves several runs in turn (a cell of the engine matrix each), so the processes and their
imports are paid for once. Every rank records in a folder the parent reads when it starts a run and how the run
ended. When a run fails on any rank, the failing process exits, its peers (possibly blocked in a collective with
it) are ended with it, and the error names the rank that failed first. With `keep_going`, a fresh process group
then carries on with the runs after it, so a failed run fails alone and leaves nothing behind for the next one:
no half-torn process group, no DeepSpeed or FSDP2 state of its own.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
import torch.multiprocessing as mp

from vray.cluster import free_port

if TYPE_CHECKING:
    from vray.train.loop import WorkerConfig

Entry = Callable[[Any], Any]  # what a rank runs for a run's config (a picklable module-level function)


def _train_worker(config: WorkerConfig) -> Any:
    from vray.train.loop import train_worker

    return train_worker(config)


def _record(folder: Path, name: str, record: dict[str, Any]) -> None:
    """Write a record whole or not at all: the parent may end this process at any moment after a peer failed."""
    tmp = folder / f".{name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"time": time.time(), **record}))
    os.replace(tmp, folder / name)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _worker(rank: int, world: int, port: int, configs: list[Any], backend: str, first: int,
            outcomes: str, entry: Entry, timeout_s: float | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    folder = Path(outcomes)
    timeout = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
    dist.init_process_group(backend, rank=rank, world_size=world, **timeout)
    try:
        for index in range(first, len(configs)):  # one process group serves several runs in turn
            # Starting run i+1 means every rank passed run i's barrier: run i succeeded even if a rank is ended
            # before it writes its own record.
            _record(folder, f"{index}-rank{rank}.start", {})
            try:
                entry(configs[index])
                dist.barrier()  # every rank finished this run before any starts the next
            except BaseException:
                _record(folder, f"{index}-rank{rank}.json", {"ok": False, "error": traceback.format_exc()})
                raise
            _record(folder, f"{index}-rank{rank}.json", {"ok": True})
    finally:
        dist.destroy_process_group()


@dataclass
class RunOutcome:
    """How one run of `run_workers` ended: on every rank, or with the errors of the ranks that failed."""

    index: int
    ok: bool
    errors: dict[int, str] = field(default_factory=dict)  # rank -> traceback or exit, the first to fail first

    def report(self) -> str:
        """The failing ranks' errors, the first failure first (the others are usually its consequence)."""
        if self.ok:
            return "ok"
        return "\n".join(f"--- rank {rank} ---\n{text}" for rank, text in self.errors.items())


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"the process was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"the process was killed by signal {-code}"
    return f"the process ended with exit code {code}, without a Python error"


def _read_outcome(folder: Path, index: int, world: int, exits: dict[int, int | None],
                  failure: BaseException | None) -> RunOutcome:
    """Run `index`'s outcome from the ranks' records and, for ranks that could not record one, their exit codes."""
    records = {rank: r for rank in range(world) if (r := _read(folder / f"{index}-rank{rank}.json")) is not None}
    if len(records) == world and all(r["ok"] for r in records.values()):
        return RunOutcome(index, True)
    if any((folder / f"{index + 1}-rank{rank}.start").exists() for rank in range(world)):
        return RunOutcome(index, True)  # a rank started the next run: every rank passed this one's barrier
    # A rank that died without a word (a crash, the OOM killer) is the cause; its peers' errors are the
    # consequence. Those the parent ended after the first failure (SIGTERM) say nothing.
    crashed = {rank: str(failure) if getattr(failure, "error_index", None) == rank else _exit_text(code)
               for rank, code in exits.items() if rank not in records and code not in (None, 0, -signal.SIGTERM)}
    raised = sorted((item for item in records.items() if not item[1]["ok"]), key=lambda item: item[1]["time"])
    errors = {**crashed, **{rank: r["error"] for rank, r in raised}}
    if not errors:
        errors = {-1: "every process ended before finishing this run, and none said why"}
    return RunOutcome(index, False, errors)


def _start(world: int, configs: list[Any], backend: str, first: int, folder: str, entry: Entry,
           timeout_s: float | None) -> tuple[dict[int, int | None], BaseException | None]:
    """Run configs[first:] in one process group; the ranks' exit codes, and the failure the processes saw."""
    context = mp.start_processes(_worker, args=(world, free_port(), configs, backend, first, folder, entry, timeout_s),
                                 nprocs=world, join=False, start_method="spawn")
    failure: BaseException | None = None
    try:
        while not context.join():
            pass
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:  # the others are ended and joined
        failure = exc
    return {rank: p.exitcode for rank, p in enumerate(context.processes)}, failure


def run_workers(config: Any, world: int, backend: str = "gloo", keep_going: bool = False,
                entry: Entry = _train_worker, timeout_s: float | None = None) -> list[RunOutcome]:
    """Train with `world` local processes (several runs one after the other when given a list).

    Without `keep_going`, the first failing run raises with the errors of its ranks, the rank that failed first
    first (not a peer that lost its connection to it). With it, every run is attempted and the outcome of each is
    returned in order; the processes are started again only after a failure. `entry` is what each rank runs for a
    config (the training worker; a picklable module-level function). `timeout_s` bounds every collective (the
    process group's timeout): a rank left waiting for its peers fails instead of hanging."""
    configs = config if isinstance(config, list) else [config]
    outcomes: list[RunOutcome] = []
    with tempfile.TemporaryDirectory(prefix="vray-workers-") as folder:
        while len(outcomes) < len(configs):
            first = len(outcomes)
            exits, failure = _start(world, configs, backend, first, folder, entry, timeout_s)
            for index in range(first, len(configs)):
                outcome = _read_outcome(Path(folder), index, world, exits, failure)
                outcomes.append(outcome)
                if not outcome.ok:
                    break  # the runs after it start again in fresh processes
            if not keep_going and not outcomes[-1].ok:
                raise RuntimeError(f"run {outcomes[-1].index} of {len(configs)} failed:\n{outcomes[-1].report()}") \
                    from failure
            if not keep_going and failure is not None:  # every run finished, then a process failed on its way out
                raise RuntimeError(f"every run finished, but a worker process failed at exit: {failure}") from failure
    return outcomes
