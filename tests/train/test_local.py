"""Local process groups that serve several runs in turn (the engine matrix): a run that fails, on one rank or by a
crash, fails alone; the runs around it still run, in shared process groups."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from vray.train.local import run_workers


def _entry(config: dict) -> None:
    """A stand-in for the training worker: sums a value over the ranks, or fails as the config says."""
    rank = dist.get_rank()
    out = Path(config["out"])
    (out / f"{config['name']}-rank{rank}.pid").write_text(str(os.getpid()))
    if config.get("raise_on") == rank:
        time.sleep(0.5)  # the other rank is blocked in the collective below by then
        raise ValueError(f"{config['name']} breaks on rank {rank}")
    if config.get("exit_on") == rank:
        time.sleep(0.5)
        os._exit(3)  # a crash: nothing is raised, nothing is recorded by this rank
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    (out / f"{config['name']}-rank{rank}.sum").write_text(str(total.item()))


def _pids(out: Path, name: str) -> set[int]:
    return {int(p.read_text()) for p in out.glob(f"{name}-rank*.pid")}


def test_a_failing_run_fails_alone_and_the_group_carries_on(tmp_path):
    names = ["a", "b", "c", "d", "e", "f"]
    configs = [{"name": n, "out": str(tmp_path)} for n in names]
    configs[1]["raise_on"] = 1  # rank 1 raises while rank 0 waits for it in an all_reduce
    configs[3]["exit_on"] = 0  # rank 0's process dies without a word
    outcomes = run_workers(configs, 2, keep_going=True, entry=_entry)
    assert [o.ok for o in outcomes] == [True, False, True, False, True, True]
    assert [o.index for o in outcomes] == list(range(6))
    first_rank, first_error = next(iter(outcomes[1].errors.items()))
    assert first_rank == 1 and "ValueError: b breaks on rank 1" in first_error  # the cause comes first
    assert "b breaks on rank 1" in outcomes[1].report() and outcomes[0].report() == "ok"
    crashed_rank, crash = next(iter(outcomes[3].errors.items()))
    assert crashed_rank == 0 and "exit code 3" in crash  # the crash, not its peer's lost connection, comes first
    for name in ("a", "c", "e", "f"):  # every run that did not fail ran to the end on both ranks
        assert [(tmp_path / f"{name}-rank{r}.sum").read_text() for r in (0, 1)] == ["3.0", "3.0"]
    # Runs share their processes until a failure; the run after a failure starts in fresh ones.
    assert _pids(tmp_path, "a") == _pids(tmp_path, "b")
    assert _pids(tmp_path, "c") == _pids(tmp_path, "d") and not _pids(tmp_path, "c") & _pids(tmp_path, "a")
    assert _pids(tmp_path, "e") == _pids(tmp_path, "f") and not _pids(tmp_path, "e") & _pids(tmp_path, "c")


def test_without_keep_going_the_first_failure_raises_with_its_traceback(tmp_path):
    configs = [{"name": "a", "out": str(tmp_path), "raise_on": 0}, {"name": "b", "out": str(tmp_path)}]
    with pytest.raises(RuntimeError, match=r"run 0 of 2 failed:\n--- rank 0 ---\nTraceback(.|\n)*a breaks on rank 0"):
        run_workers(configs, 2, entry=_entry)
    assert not list(tmp_path.glob("b-*"))
