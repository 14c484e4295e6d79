"""The data pipeline: deterministic, complete, disjoint per rank, resumable; Ray Data preprocessing; S3 datasets."""

from __future__ import annotations

import json

import pytest
import torch

from vray.archs import registry
from vray.cluster import connect
from vray.data import synthetic
from vray.data.io import read_samples, write_samples
from vray.data.pipeline import DataOrder, SampleRows, SampleStream
from vray.data.sample import Sample
from vray.spec import MediaBlock
from vray.train.loop import CollatorFactory


def test_order_is_seeded_complete_and_split_over_ranks():
    order = DataOrder(num_samples=10, effective_batch=4, micro_batch=2, seed=7)
    assert order.steps_per_epoch == 3
    e0, e1 = order.epoch_order(0), order.epoch_order(1)
    assert e0 == DataOrder(10, 4, 2, 7).epoch_order(0)  # same seed, same order
    assert e0 != e1 and e0 != DataOrder(10, 4, 2, 8).epoch_order(0)
    assert set(e0) == set(range(10)) and len(e0) == 12  # every sample, wrapped around to whole steps
    ranks = [DataOrder(10, 4, 2, 7, rank=r, world=2) for r in range(2)]
    for step in range(6):
        a, b = (r.step_indexes(step) for r in ranks)
        assert len(a) == len(b) == 2 and sorted(a + b) == sorted(order.step_indexes(step))
    pos = order.position(4)
    assert (pos.epoch, pos.samples_consumed) == (1, 16)


def _factory() -> CollatorFactory:
    return CollatorFactory("tiny:qwen2_5_vl", None, registry.get("qwen2.5vl", "3B"), "Answer briefly.", MediaBlock(), None)


def _ids(micro_batches) -> list[list[int]]:
    return [e.tensors["input_ids"].tolist() for mb in micro_batches for e in mb]


def test_stream_yields_the_planned_samples_in_order_and_resumes():
    samples = read_samples(str(synthetic.split_paths("synthetic:vqa?train=12&eval=2")[0])).samples
    order = DataOrder(len(samples), 4, 2, seed=3)
    collator = _factory()()
    stream = SampleStream(samples, order, _factory(), use_ray=False, actors=2)
    steps = list(stream.steps(0, 6))
    assert [len(mb) for step in steps for mb in step] == [2] * 12
    for step, micro_batches in enumerate(steps):
        expected = [collator.encode(samples[i]).tensors["input_ids"].tolist() for i in order.step_indexes(step)]
        assert _ids(micro_batches) == expected
    resumed = list(SampleStream(samples, order, _factory(), use_ray=False).steps(4, 6))
    assert [_ids(s) for s in resumed] == [_ids(s) for s in steps[4:]]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_data_preprocessing_matches_and_keeps_the_order(ray_head):
    import ray

    if not ray.is_initialized():
        connect(ray_head, log_to_driver=False)
    samples = read_samples(str(synthetic.split_paths("synthetic:vqa?train=12&eval=2")[0])).samples
    order = DataOrder(len(samples), 4, 2, seed=3, rank=1, world=2)
    local = list(SampleStream(samples, order, _factory(), use_ray=False).steps(0, 6))
    stream = SampleStream(samples, order, _factory(), use_ray=True, actors=1)
    remote = list(stream.steps(0, 6))
    assert [_ids(s) for s in remote] == [_ids(s) for s in local]
    for a, b in zip(remote, local):
        for ea, eb in zip(a[0], b[0]):
            assert torch.equal(ea.tensors["pixel_values"], eb.tensors["pixel_values"])
            assert torch.equal(ea.tensors["labels"], eb.tensors["labels"])
    assert stream.wait_seconds > 0


@pytest.mark.slow
def test_datasets_on_s3_jsonl_and_parquet_with_relative_images(s3_endpoint, tmp_path):
    import fsspec

    from vray.data.media import load_image

    local = synthetic.materialize("synthetic:grounding?train=4&eval=2")
    fs = fsspec.filesystem("s3")
    fs.put(str(local / "images"), "vray-test/ds/images", recursive=True)
    rows = [json.loads(line) for line in (local / "train.jsonl").read_text().splitlines()]
    with fs.open("vray-test/ds/data.jsonl", "w") as fh:
        fh.write("\n".join(json.dumps(r) for r in rows) + "\n")
    samples = read_samples("s3://vray-test/ds/data.jsonl").samples
    assert len(samples) == 4 and samples[0].images[0].startswith("s3://vray-test/ds/images/")
    assert load_image(samples[0].images[0]).size == (112, 112)
    # Parquet on S3, written by vray and read back (folder form).
    write_samples(samples, "s3://vray-test/pq", parquet=True)
    again = read_samples("s3://vray-test/pq").samples
    assert [s.model_dump() for s in again] == [s.model_dump() for s in samples]
    arch = registry.get("qwen2.5vl", "3B")
    from vray.data.check import check_dataset

    report = check_dataset("s3://vray-test/ds/data.jsonl", arch, None)
    assert not report.errors and report.rows == 4


def test_packed_rows_come_back_typed_without_validation_and_only_those_asked(tmp_path, monkeypatch):
    """What a worker receives of the checked data: the driver's Sample objects, unpickled one by one."""
    samples = read_samples(str(synthetic.split_paths("synthetic:grounding?train=6&eval=2")[0])).samples
    rows = SampleRows.in_folder("train.jsonl", samples, tmp_path / "rows")

    def no_validation(*args, **kwargs):
        raise AssertionError("a worker validated a sample again")

    monkeypatch.setattr(Sample, "model_validate", classmethod(no_validation))
    mine = rows.read([4, 1, 4])
    assert sorted(mine) == [1, 4] and all(type(s) is Sample for s in mine.values())
    assert {i: s.model_dump() for i, s in mine.items()} == {i: samples[i].model_dump() for i in (1, 4)}


@pytest.mark.slow
def test_rows_in_the_object_store_reach_a_worker_without_the_driver_files(ray_head, tmp_path):
    """On a cluster a worker may run on a node without the driver's disk: it reads its rows from the object store."""
    import shutil

    import ray

    if not ray.is_initialized():
        connect(ray_head, log_to_driver=False)
    folder = synthetic.materialize("synthetic:vqa?train=8&eval=2&seed=11")
    copy = tmp_path / "train.jsonl"
    shutil.copy(folder / "train.jsonl", copy)
    samples = read_samples(str(copy)).samples
    rows = SampleRows.in_object_store(str(copy), samples)
    copy.unlink()  # the worker must not need the driver's file

    @ray.remote(num_cpus=0)
    def worker_reads(config: dict) -> dict:
        return {i: s.id for i, s in config["rows"].read([5, 2]).items()}

    assert ray.get(worker_reads.remote({"rows": rows})) == {2: samples[2].id, 5: samples[5].id}
