"""The training objective in one process: the vision dummy of text-only micro-batches changes nothing but runs the
vision side, and sparse-MoE full fine-tuning carries the router's load-balancing loss. (The token weighting over
micro-batches and ranks runs in the engine matrix's process groups: tests/train/test_engines.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.train.probes import StepProbe
from vray.archs import registry
from vray.data.collate import Collator
from vray.data.io import read_jsonl
from vray.data.synthetic import split_paths
from vray.models.loader import load_processor, prepare_for_training, resolve_source
from vray.models.tiny import FAMILIES, REFERENCE
from vray.spec import LoraBlock, validate_spec
from vray.train.loop import router_aux_coef
from vray.train.loss import answer_tokens, token_loss_sum
from vray.train.prepare import prepare, worker_config

DATA = "synthetic:vqa?train=8&eval=2"


@pytest.mark.parametrize("family", FAMILIES)
def test_a_text_only_micro_batch_runs_the_vision_side_and_its_loss_is_unchanged(family):
    arch = registry.get(*REFERENCE[family])
    path = resolve_source(f"tiny:{family}")
    collator = Collator(load_processor(path), arch, None)
    sample = read_jsonl(split_paths(DATA)[0])[0]
    text_only = collator.encode(sample.model_copy(update={"images": ()}))
    assert "pixel_values" not in text_only.tensors
    model, _ = prepare_for_training(path, arch, "Full", "Float32", None, LoraBlock(), torch.device("cpu"))
    model.train()
    plain = collator.batch([text_only])
    dummy = collator.batch(collator.with_vision([text_only]))
    assert "pixel_values" in dummy and answer_tokens(dummy["labels"]) == answer_tokens(plain["labels"])
    losses = []
    for batch in (plain, dummy):
        labels = batch.pop("labels")
        losses.append(token_loss_sum(model(**batch).logits, labels))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    losses[1].backward()
    projector = [p for n, p in model.named_parameters() if any(n.startswith(m) for m in arch.projector_modules)]
    assert projector and all(p.grad is not None for p in projector)  # it ran: DDP and the sharded engines agree
    assert all(float(p.grad.abs().max()) == 0.0 for p in projector)  # and moved nothing


def _moe_step(family: str, tmp: Path, coef: float | None) -> tuple[dict[str, torch.Tensor], float]:
    """Weights after one SGD step (lr 1) of full fine-tuning on one sample, in this process (no process group)."""
    name, size = REFERENCE[family]
    full = {"routerAuxLossCoef": coef} if coef is not None else {}
    spec = validate_spec({
        "architecture": {"name": name, "size": size}, "model": {"source": f"tiny:{family}"},
        "trainingMode": {"type": "Full"}, "full": full, "compute": {"precisionType": "Float32"}, "task": "vqa",
        "data": {"train": DATA}, "cluster": {"workers": 1},
        "hyperparameters": {"epochs": 1, "learningRate": 1.0, "batchSize": 1, "optimizer": "SGD",
                            "warmupRatio": 0.0, "maxGradNorm": 1e6},
        "output": str(tmp), "name": f"{family}-{coef}",
    })
    prepared = prepare(spec)
    config = worker_config(prepared, rows_in=tmp / f"rows-{family}-{coef}")
    out = tmp / f"{family}-{coef}.pt"
    StepProbe(config, (((0,),),), str(out)).run()
    return torch.load(out, weights_only=False)["weights"], prepared.spec


@pytest.mark.parametrize("family", ["qwen3_vl_moe", "qwen3_5_moe"])
def test_moe_full_fine_tuning_carries_the_router_load_balancing_loss(family, tmp_path):
    with_aux, spec = _moe_step(family, tmp_path, None)
    without, _ = _moe_step(family, tmp_path, 0.0)
    routers = [n for n in with_aux if n.endswith("mlp.gate.weight")]
    assert routers
    # The aux loss moves the routers (and nothing downstream of the language model, such as the LM head).
    assert max(float((with_aux[n] - without[n]).abs().max()) for n in routers) > 1e-7
    head = [n for n in with_aux if n.startswith("lm_head")]
    assert head and all(torch.equal(with_aux[n], without[n]) for n in head)
    # The coefficient defaults to the checkpoint's router_aux_loss_coef; the spec overrides it; LoRA has none.
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_source(f"tiny:{family}"))
    assert config.text_config.router_aux_loss_coef > 0
    assert router_aux_coef(spec, config) == pytest.approx(config.text_config.router_aux_loss_coef)
    assert router_aux_coef(spec.model_copy(update={"full": spec.full.model_copy(update={"routerAuxLossCoef": 0.5})}),
                           config) == 0.5
    lora = spec.model_copy(update={"trainingMode": spec.trainingMode.model_copy(update={"type": "LoRA"})})
    assert router_aux_coef(lora, config) == 0.0
