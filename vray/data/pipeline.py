"""The data pipeline of a training worker: deterministic order, parallel preprocessing, a resumable position.

The driver checks every row and packs the samples it keeps, each pickled once, into one shared buffer
(`SampleRows`: Ray's object store, or a file for runs without Ray); a worker unpickles only the rows it trains
on, an epoch at a time (`WorkerData`, `RankRows`), as typed samples that are never validated again. The order of every epoch is a permutation drawn
from the seed and the epoch, padded by wrapping around to whole optimizer steps; each rank takes every
world-size-th sample of a step. Decoding, resizing and tokenizing run ahead of the training
loop in a Ray Data actor pool (in a thread pool without Ray) and stream back in order. The position
(epoch, samples consumed) follows from the optimizer step, so a checkpoint stores it and a resumed run
continues from it.
"""

from __future__ import annotations

import functools
import math
import pickle
import random
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vray.data.sample import Sample
from vray.errors import DataError


@dataclass(frozen=True)
class SampleRows:
    """The samples the driver's check kept, each pickled once into one buffer every worker of the run can map:
    an object in Ray's object store (read zero-copy, one copy per node) or two .npy files on the driver's machine
    (memory-mapped: file-backed, shared by the local processes). A worker unpickles only the rows it asks for:
    typed samples, not validated again, and never the whole dataset."""

    source: str  # the dataset the rows came from (for messages)
    count: int
    where: Any  # a Ray ObjectRef of (offsets, data), or the folder holding offsets.npy and rows.npy

    @staticmethod
    def _pack(samples: Sequence[Sample]) -> tuple[np.ndarray, np.ndarray]:
        blobs = [pickle.dumps(s, protocol=pickle.HIGHEST_PROTOCOL) for s in samples]
        offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in blobs], out=offsets[1:])
        return offsets, np.frombuffer(b"".join(blobs), dtype=np.uint8)

    @classmethod
    def in_object_store(cls, source: str, samples: Sequence[Sample]) -> SampleRows:
        """The rows in Ray's object store (workers on any node of the cluster read them)."""
        import ray

        return cls(source, len(samples), ray.put(cls._pack(samples)))

    @classmethod
    def in_folder(cls, source: str, samples: Sequence[Sample], folder: str | Path) -> SampleRows:
        """The rows in `folder` on this machine (for workers that run on it: local processes, this process)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        offsets, data = cls._pack(samples)
        np.save(folder / "offsets.npy", offsets)
        np.save(folder / "rows.npy", data)
        return cls(source, len(samples), str(folder))

    def __len__(self) -> int:
        return self.count

    def _buffers(self) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(self.where, str):
            folder = Path(self.where)
            return np.load(folder / "offsets.npy", mmap_mode="r"), np.load(folder / "rows.npy", mmap_mode="r")
        import ray

        return ray.get(self.where)

    def read(self, indexes: Iterable[int]) -> dict[int, Sample]:
        """The samples at these positions (0-based, among the kept rows)."""
        offsets, data = self._buffers()
        return {i: pickle.loads(data[offsets[i]:offsets[i + 1]].tobytes()) for i in sorted(set(indexes))}


@dataclass(frozen=True)
class DataPosition:
    """Where training is in the data."""

    epoch: int
    samples_consumed: int  # over all workers, since the start of the run

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "samples_consumed": self.samples_consumed}


@functools.lru_cache(maxsize=2)
def _epoch_order(num_samples: int, need: int, seed: int, epoch: int) -> np.ndarray:
    """One epoch's seeded order, shuffled once, as a read-only int64 array (8 bytes a sample): every step of the
    epoch slices it. Only two epochs are kept (the one being walked and the next), so the memory a worker holds
    for the order stays one dataset's worth of indexes, whatever the number of epochs."""
    order = list(range(num_samples))
    random.Random(seed * 1000003 + epoch).shuffle(order)
    array = np.resize(np.asarray(order, dtype=np.int64), need)  # wraps around to fill the last step
    array.flags.writeable = False
    return array


@dataclass(frozen=True)
class DataOrder:
    """The deterministic order of a run's samples over epochs and ranks. Nothing is built for the whole run: each
    epoch's order is drawn when a step of it is first asked for."""

    num_samples: int
    effective_batch: int
    micro_batch: int
    seed: int
    rank: int = 0
    world: int = 1

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.num_samples / self.effective_batch))

    def _order(self, epoch: int) -> np.ndarray:
        return _epoch_order(self.num_samples, self.steps_per_epoch * self.effective_batch, self.seed, epoch)

    def epoch_order(self, epoch: int) -> list[int]:
        """Every sample once in a seeded order, wrapped around to fill the last step (nothing dropped)."""
        return self._order(epoch).tolist()

    def rank_indexes(self, start: int, stop: int) -> np.ndarray:
        """This rank's sample indexes of the optimizer steps [start, stop) of one epoch, one row a step."""
        epoch, first = divmod(start, self.steps_per_epoch)
        last = stop - epoch * self.steps_per_epoch
        if stop <= start or last > self.steps_per_epoch:
            raise ValueError(f"steps [{start}, {stop}) are not inside one epoch of {self.steps_per_epoch} steps")
        steps = self._order(epoch).reshape(self.steps_per_epoch, self.effective_batch)
        return steps[first:last, self.rank::self.world]

    def step_indexes(self, step: int) -> list[int]:
        """This rank's sample indexes of global optimizer step `step` (0-based)."""
        return self.rank_indexes(step, step + 1)[0].tolist()

    def position(self, step: int) -> DataPosition:
        """The data position after `step` optimizer steps."""
        return DataPosition(epoch=step // self.steps_per_epoch, samples_consumed=step * self.effective_batch)

    def epoch_spans(self, start: int, stop: int) -> list[tuple[int, int]]:
        """The optimizer steps [start, stop) cut at epoch boundaries."""
        spans, step = [], start
        while step < stop:
            end = min(stop, (step // self.steps_per_epoch + 1) * self.steps_per_epoch)
            spans.append((step, end))
            step = end
        return spans


@dataclass(frozen=True)
class RankRows:
    """One rank's training samples, read from the checked rows for a span of steps at a time: the stream asks
    for one epoch's share, so a worker never holds more than that."""

    rows: SampleRows
    order: DataOrder

    def indexes(self, start: int, stop: int) -> set[int]:
        """The sample indexes this rank trains in the optimizer steps [start, stop)."""
        parts = [self.order.rank_indexes(a, b).ravel() for a, b in self.order.epoch_spans(start, stop)]
        return set(np.unique(np.concatenate(parts)).tolist()) if parts else set()

    def for_steps(self, start: int, stop: int) -> dict[int, Sample]:
        """The samples this rank trains in the steps [start, stop), by index."""
        return self.rows.read(self.indexes(start, stop))


@dataclass(frozen=True)
class WorkerData:
    """One rank's data: its training rows (read an epoch at a time), its share of the held-out samples, and the
    held-out sample a rank repeats when it runs out before the others (never scored)."""

    order: DataOrder
    total_steps: int
    train: RankRows
    eval: list[Sample]
    eval_filler: list[Sample]

    @classmethod
    def read(cls, train: SampleRows, eval_rows: SampleRows | None, order: DataOrder, epochs: int) -> WorkerData:
        """Read this rank's held-out rows (every world-size-th from its rank on); its training rows are read an
        epoch at a time, when the stream reaches the epoch (nothing of the order is built here)."""
        total = order.steps_per_epoch * epochs
        count = len(eval_rows) if eval_rows is not None else 0
        mine = range(order.rank, count, order.world)
        held_out = eval_rows.read([*mine, 0]) if count else {}
        return cls(order, total, RankRows(train, order), [held_out[i] for i in mine], [held_out[0]] if count else [])


def encode_or_stand_in(collator: Any, sample: Sample) -> Any:
    """The collator's encoding of a training sample, or, when it raises a DataError (an image or video replaced or
    deleted after the data check), its `stand_in`: the vision dummy, every label ignored, which says what it stands
    for. A worker never stops on one sample; the training loop counts it, and reports or refuses it."""
    try:
        return collator.encode(sample)
    except DataError as exc:
        return collator.stand_in(sample, exc)


def _split(indexes: list[int], size: int) -> list[list[int]]:
    return [indexes[j:j + size] for j in range(0, len(indexes), size)]


class _Preprocessor:
    """A Ray Data actor: builds the collator once, then encodes batches of samples."""

    def __init__(self, make_collator: Any):
        self.collator = make_collator()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        payloads = []
        for row in batch["row"]:
            payloads.append(pickle.dumps(encode_or_stand_in(self.collator, pickle.loads(row))))
        return {"step": batch["step"], "payload": payloads}


class SampleStream:
    """Encoded micro-batches of one worker, in order, from a given step to the end of training. `samples` is this
    rank's `RankRows` (read an epoch at a time), or every sample by index (a list or a mapping)."""

    def __init__(self, samples: RankRows | Mapping[int, Sample] | Sequence[Sample], order: DataOrder,
                 make_collator: Any, use_ray: bool, prefetch: int = 4, actors: int = 1):
        self.samples = samples
        self.order = order
        self.make_collator = make_collator
        self.use_ray = use_ray
        self.prefetch = prefetch
        self.actors = actors
        self._collator: Any = None  # built once, on first use, for the thread pool
        self.wait_seconds = 0.0  # time the training loop spent waiting for data
        self.step_wait = 0.0  # ... for the last step

    def steps(self, start: int, stop: int) -> Iterator[list[list[Any]]]:
        """For each optimizer step in [start, stop): this rank's micro-batches of Encoded samples. Each epoch's
        share is read and its order drawn when the stream reaches it."""
        for a, b in self.order.epoch_spans(start, stop):
            t0 = time.perf_counter()
            samples = self.samples.for_steps(a, b) if isinstance(self.samples, RankRows) else self.samples
            read = time.perf_counter() - t0  # reading the epoch's rows is waiting for data too
            indexes = self.order.rank_indexes(a, b)  # one row a step: this rank's share of the epoch's order
            source = self._ray(a, indexes, samples) if self.use_ray else self._threads(a, indexes, samples)
            encoded_by_step: dict[int, list[Any]] = {}
            for step in range(a, b):
                need = indexes.shape[1]
                self.step_wait, read = read, 0.0
                while len(encoded_by_step.get(step, [])) < need:
                    t0 = time.perf_counter()
                    s, enc = next(source)
                    self.step_wait += time.perf_counter() - t0
                    encoded_by_step.setdefault(s, []).append(enc)
                self.wait_seconds += self.step_wait
                items = encoded_by_step.pop(step)
                yield _split(items, self.order.micro_batch)

    @staticmethod
    def _work(first: int, indexes: np.ndarray) -> Iterator[tuple[int, int]]:
        """(step, sample index) of an epoch's span, generated as it is consumed."""
        for row, step_indexes in enumerate(indexes.tolist()):
            for i in step_indexes:
                yield first + row, i

    def _threads(self, first: int, indexes: np.ndarray, samples: Any) -> Iterator[tuple[int, Any]]:
        if self._collator is None:
            self._collator = self.make_collator()
        collator = self._collator
        with ThreadPoolExecutor(max_workers=max(1, self.actors)) as pool:
            window = max(1, self.prefetch * self.order.micro_batch)
            futures: deque[tuple[int, Any]] = deque()
            it = self._work(first, indexes)
            for step, i in it:
                futures.append((step, pool.submit(encode_or_stand_in, collator, samples[i])))
                if len(futures) >= window:
                    break
            for step, i in it:
                s, f = futures.popleft()
                yield s, f.result()
                futures.append((step, pool.submit(encode_or_stand_in, collator, samples[i])))
            for s, f in futures:
                yield s, f.result()

    def _ray(self, first: int, indexes: np.ndarray, samples: Any) -> Iterator[tuple[int, Any]]:
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        # The Sample objects themselves, pickled: the actors encode them without parsing them again.
        rows = [{"step": step, "row": pickle.dumps(samples[i])} for step, i in self._work(first, indexes)]
        if not rows:
            return
        ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / max(1, self.order.micro_batch))))
        ds = ds.map_batches(_Preprocessor, fn_constructor_args=(self.make_collator,), batch_size=self.order.micro_batch,
                            compute=ray.data.ActorPoolStrategy(size=max(1, self.actors)), num_cpus=0.5)
        for batch in ds.iter_batches(batch_size=None, prefetch_batches=self.prefetch, batch_format="numpy"):
            for step, payload in zip(batch["step"], batch["payload"]):
                yield int(step), pickle.loads(payload)


# ---- Ray tasks over batches (the data check) -----------------------------------------------------------------
_SHARED: dict[str, Any] = {}  # per worker process: the last shared object a task unpickled, by object id


def _run_batch(fn: Any, shared: list[Any], batch: Any) -> Any:
    import ray

    ref = shared[0]  # inside a list: Ray hands the reference over, not its value, so each process reads it once
    key = ref.hex()
    if key not in _SHARED:
        _SHARED.clear()
        _SHARED[key] = ray.get(ref)
    return fn(_SHARED[key], batch)


def ray_map(fn: Any, shared: Any, batches: Sequence[Any], local: bool = False, finished: Any = None,
            sizes: Sequence[int] | None = None, in_flight: int | None = None) -> Iterator[Any]:
    """`fn(shared, batch)` for every batch, as Ray tasks of one CPU each on the cluster, yielded in batch order.
    `shared` is put in the object store once (and unpickled once per worker process). At most `in_flight` tasks
    (default: twice the cluster's CPUs) are out at a time. `finished(n)` is called as tasks complete, with the
    total of `sizes` (default: 1 a batch) of the batches done so far, in whatever order they finish. With `local`,
    the tasks prefer this machine, where a local path names what the driver sees; a node that cannot run them
    (no CPUs, like a KubeRay head) hands them to the rest of the cluster; otherwise they spread over its nodes.
    Ray must be initialised."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    options: dict[str, Any] = {"num_cpus": 1, "max_retries": 2, "scheduling_strategy": "SPREAD"}
    if local:
        try:
            node = ray.get_runtime_context().get_node_id()
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=True)
        except Exception:  # noqa: BLE001 - a driver outside the cluster (Ray Client) has no node
            pass
    task = ray.remote(_run_batch).options(**options)
    holder = [ray.put(shared)]
    sizes = list(sizes) if sizes is not None else [1] * len(batches)
    limit = in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending: dict[Any, int] = {}
    ready: dict[int, Any] = {}
    submitted, emitted, done = 0, 0, 0
    while emitted < len(batches):
        while submitted < len(batches) and len(pending) + len(ready) < limit:
            pending[task.remote(fn, holder, batches[submitted])] = submitted
            submitted += 1
        if emitted not in ready:
            finished_refs, _ = ray.wait(list(pending), num_returns=1)
            for ref in finished_refs:
                i = pending.pop(ref)
                ready[i] = ray.get(ref)
                done += sizes[i]
                if finished is not None:
                    finished(done)
        while emitted in ready:
            yield ready.pop(emitted)
            emitted += 1
