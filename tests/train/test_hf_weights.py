"""final/'s Hugging Face weights, streamed one tensor at a time into safetensors shards, load back as the model."""

from __future__ import annotations

import json

import pytest
import torch

from vray.archs.registry import get
from vray.models.loader import load_model, resolve_source
from vray.train.engines import _tied_names, write_hf_weights


@pytest.mark.parametrize("family,arch", [("qwen2_5_vl", ("qwen2.5vl", "3B")), ("qwen3_vl_moe", ("qwen3vl", "30B-A3B"))])
def test_streamed_shards_load_back_as_the_same_model(tmp_path, family, arch):
    source = resolve_source(f"tiny:{family}")
    model = load_model(source, get(*arch), "Float32")
    tied = _tied_names(model)
    streamed = []

    def tensors():
        for name, param in model.named_parameters():
            if name not in tied:
                streamed.append(name)
                yield name, param.detach().clone()

    write_hf_weights(model, tmp_path, tensors(), shard_bytes=64 * 1024)  # several shards, each of whole layers
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((tmp_path / s).exists() for s in shards)
    again = load_model(tmp_path, get(*arch), "Float32")
    want, got = model.state_dict(), again.state_dict()
    assert set(want) == set(got)
    for name in want:
        assert torch.equal(want[name], got[name]), name
