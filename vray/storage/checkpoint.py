"""The checkpoint protocol: stage, write, publish with the marker last, keep the latest and the best N.

A checkpoint is written by every rank of a run (each rank saves its shards) and becomes visible only when it is
complete:
- on a local run directory, every rank writes into one staging folder beside the target, and rank 0 renames it
  into place and writes the marker (`vray_checkpoint.json`);
- on a remote one (s3://...), every rank writes a local folder and hands it to its background uploader, then
  training goes on. The uploader sends the files in parallel (multipart for large ones), then a small receipt
  (`.uploaded/rank-R.json`); rank 0's uploader writes the marker once every rank's receipt is there. No collective
  waits on an upload, and a checkpoint still uploading has no marker, so no reader and no retention sees it.
  `wait()` (at the end of a run) returns when every upload of this rank is done. Each upload step waits out an
  object-store outage (vray.storage.retry); one past the budget stops the run with the endpoint, the last complete
  checkpoint and the resume command.
Readers (resume, serving, evaluation) take only folders with the marker. The trainer and the test kit write
checkpoints through this one class; a single process is a group of one.
"""

from __future__ import annotations

import json
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vray.errors import VrayError
from vray.fs import filesystem
from vray.storage.retry import StorageOutage, with_retries
from vray.storage.rundir import CHECKPOINT_MARKER, RECEIPTS, RunDir, read_checkpoint_info

UPLOAD_CONCURRENCY = 8  # files in flight at once, and parts in flight per multipart file
RECEIPT_TIMEOUT_S = 6 * 3600.0  # how long rank 0 waits for the other ranks' uploads of one checkpoint


def _alone() -> None:
    return None


def outage_message(run: RunDir, outage: StorageOutage, what: str, last_complete: str | None = None) -> str:
    """One line for an outage past the budget: the endpoint that stayed away, the last complete checkpoint (this
    writer's, else one quick look without retries in case the store is back), and the command that continues."""
    latest = last_complete
    if latest is None:
        try:
            found = run.latest_checkpoint(retried=False)
            latest = str(found) if found is not None else None
        except Exception:  # noqa: BLE001 - still unreachable
            latest = "unknown (the store did not answer; it is the newest checkpoints/step-N with its marker)"
    where = f"the last complete checkpoint is {latest}" if latest else "there is no complete checkpoint yet"
    return f"{what} stopped: {outage}; {where}; continue with `vray train --resume {run.uri}`"


class Uploader:
    """One background thread per rank: uploads staged checkpoints in order, off the training loop's path."""

    def __init__(self, describe: Callable[[StorageOutage], str] | None = None) -> None:
        self._describe = describe  # the one-line message of an outage past the retry budget
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], None]) -> None:
        self.raise_failure()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vray-checkpoint-upload", daemon=True)
            self._thread.start()
        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                if self._error is None:
                    job()
            except BaseException as exc:  # noqa: BLE001 - reported on the training thread
                self._error = exc
            finally:
                self._jobs.task_done()

    def wait(self) -> None:
        """Block until every submitted upload finished; raise the first one that failed."""
        if self._thread is not None:
            self._jobs.join()
        self.raise_failure()

    def raise_failure(self) -> None:
        if self._error is not None:
            if isinstance(self._error, StorageOutage) and self._describe is not None:
                raise VrayError(self._describe(self._error)) from self._error
            raise VrayError(f"a checkpoint upload failed: {self._error}") from self._error


class CheckpointWriter:
    """Writes the checkpoints of one run directory from one rank of the run's process group."""

    def __init__(self, run: RunDir, rank: int = 0, barrier: Callable[[], None] = _alone, world: int = 1):
        self.run = run
        self.rank = rank
        self.barrier = barrier
        self.world = world
        self.last_complete: str | None = None  # rank 0: the newest checkpoint this writer published
        self._swept = False  # a remote run's leftovers of an interrupted attempt: removed once, at the attempt's start
        self.uploader = Uploader(self._outage_message)

    def stage(self, name: str, rel: str | None = None) -> Path:
        """A folder this rank writes the checkpoint `name` into: one shared folder on a local run (inside it, so the
        final rename is atomic), one per rank on a remote one (uploaded by `publish`). On a remote run, rank 0 first
        removes what an earlier, interrupted attempt left at `rel`."""
        if self.run.local:
            folder = self.run.checkpoints / f".{name}.tmp"
            if self.rank == 0:
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True)
            self.barrier()
            return folder
        if rel is not None:
            self.begin_attempt()
        return Path(tempfile.mkdtemp(prefix=f"vray-{name}-rank{self.rank}-"))

    def begin_attempt(self) -> None:
        """Every rank, once per attempt (the trainer at its start; else the first checkpoint): on a remote run, rank 0
        sweeps what an interrupted attempt left uploading, and the others wait for it."""
        if self.run.local or self._swept:
            return
        if self.rank == 0:
            self.sweep_incomplete()
        self._swept = True
        self.barrier()

    def sweep_incomplete(self) -> list[str]:
        """Rank 0 of a remote run, at the start of an attempt: remove what an earlier, interrupted attempt
        left uploading (checkpoint folders and final/ without their marker). No other attempt runs meanwhile, and this
        one has written nothing yet; one listing, so no later checkpoint waits on the object store for it."""
        fs, path = filesystem(self.run.join("checkpoints"))

        def leftovers() -> list[str]:
            fs.invalidate_cache()
            names = ([f"checkpoints/{e.rstrip('/').rsplit('/', 1)[-1]}" for e in fs.ls(path, detail=False)]
                     if fs.exists(path) else [])
            return [rel for rel in [*names, "final"]
                    if fs.exists(self.run.join(rel)) and not fs.exists(self.run.join(rel, CHECKPOINT_MARKER))]
        found = with_retries(leftovers, self.run.join("checkpoints"), f"listing {self.run.join('checkpoints')}")
        for rel in found:
            self.run.remove(rel)
        return found

    def then(self, job: Callable[[], None]) -> None:
        """Run `job` once every checkpoint handed over so far is published: at once on a local run, on the uploader
        thread of a remote one (so what it does to the object store never holds up the training steps)."""
        if self.run.local:
            job()
        else:
            self.uploader.submit(job)

    def publish(self, staged: Path, rel: str, info: dict[str, Any]) -> str:
        """Make what every rank wrote into `staged` the checkpoint at `rel` (relative to the run), marker last.
        Every rank calls it; it returns the checkpoint's path or URI (remote: published in the background)."""
        marker = json.dumps(info, indent=2) + "\n"
        if self.run.local:
            self.barrier()
            if self.rank == 0:
                (staged / CHECKPOINT_MARKER).write_text(marker)
                target = self.run.root / rel
                shutil.rmtree(target, ignore_errors=True)
                target.parent.mkdir(parents=True, exist_ok=True)
                staged.replace(target)
            self.barrier()
            return str(self.run.root / rel)
        self.uploader.submit(lambda: self._upload(staged, rel, marker))
        return self.run.join(rel)

    def _upload(self, staged: Path, rel: str, marker: str) -> None:
        """On the uploader thread: this rank's files in parallel, its receipt, and (rank 0) the marker last. Each step
        is retried through an object-store outage (vray.storage.retry); a retried put sends only the files not yet
        there whole, and the marker goes up only once every rank's receipt is there."""
        uri = self.run.join(rel)
        fs, path = filesystem(uri)
        files = [f for f in sorted(staged.rglob("*")) if f.is_file()]
        if files:
            targets = {str(f): f"{path}/{f.relative_to(staged).as_posix()}" for f in files}
            options: dict[str, Any] = {}
            if getattr(fs, "async_impl", False):  # s3fs and the like: files and multipart parts concurrently
                options["batch_size"] = UPLOAD_CONCURRENCY
                if type(fs).__name__ == "S3FileSystem":
                    options["max_concurrency"] = UPLOAD_CONCURRENCY
            tried: list[bool] = []

            def put() -> None:
                todo = dict(targets)
                if tried:  # an earlier attempt failed part-way: what is there whole (by size) stays
                    fs.invalidate_cache(path)
                    there = {k.rstrip("/"): v.get("size") for k, v in fs.find(path, detail=True).items()}
                    todo = {src: dst for src, dst in todo.items()
                            if there.get(dst.rstrip("/")) != Path(src).stat().st_size}
                tried.append(True)
                if todo:
                    fs.put(list(todo), list(todo.values()), **options)
            with_retries(put, uri, f"uploading rank {self.rank}'s part of {uri}")
        shutil.rmtree(staged, ignore_errors=True)
        self.run.write_text(f"{rel}/{RECEIPTS}/rank-{self.rank}.json", json.dumps({"files": len(files)}) + "\n")
        if self.rank != 0:
            return
        deadline = time.monotonic() + RECEIPT_TIMEOUT_S
        while not all(self.run.exists(f"{rel}/{RECEIPTS}/rank-{r}.json") for r in range(self.world)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.run.join(rel)}: not every rank uploaded its part")
            time.sleep(0.2)
        self.run.write_text(f"{rel}/{CHECKPOINT_MARKER}", marker)
        if rel.startswith("checkpoints/"):
            self.last_complete = uri

    def _outage_message(self, outage: StorageOutage) -> str:
        return outage_message(self.run, outage, "checkpoint upload", self.last_complete)

    def wait(self) -> None:
        """Return when every checkpoint this rank handed to its uploader is uploaded (rank 0: and published)."""
        self.uploader.wait()

    def write(self, rel: str, save: Callable[[Path], None], info: dict[str, Any]) -> str:
        """Stage, let `save(folder)` write this rank's part, and publish: the whole protocol in one call."""
        staged = self.stage(rel.rsplit("/", 1)[-1], rel)
        save(staged)
        return self.publish(staged, rel, info)

    def retain(self, metric: str, keep_best: int) -> None:
        """Rank 0: keep the latest complete checkpoint, the best `keep_best` by `metric` (higher is better) and the
        one `best` points at; remove the others. A checkpoint still uploading is not complete: it is never touched."""
        if self.rank != 0:
            return
        found = self.run.complete_checkpoints()
        if len(found) <= 1:
            return
        scored = []
        for step, path in found:
            value = read_checkpoint_info(path)["metrics"].get(metric)
            scored.append((value if value is not None else float("-inf"), step, path))
        keep = {found[-1][0]} | {step for _, step, _ in sorted(scored, key=lambda t: (-t[0], t[1]))[:keep_best]}
        best = self.run.best_checkpoint()
        for step, path in found:
            if step not in keep and str(path) != str(best):
                self.run.remove(f"checkpoints/step-{step}")
