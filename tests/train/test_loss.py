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


# ---- the label-only loss: the LM head at the scored positions only, chunk by chunk ----------------------------

def _two_rows(collator: Collator) -> dict[str, torch.Tensor]:
    """A padded micro-batch of two rows of different lengths (an image in the first, text only in the second), with
    answers of several tokens labelled."""
    first, second = read_jsonl(split_paths(DATA)[0])[:2]

    def answered(sample, question: str, answer: str):
        user, assistant = sample.conversation
        return sample.model_copy(update={"conversation": (user.model_copy(update={"text": user.text + question}),
                                                           assistant.model_copy(update={"text": answer}))})

    encoded = [collator.encode(answered(first, "", "blue, on a plain white background")),
               collator.encode(answered(second, " Answer in a few words.", "green circle").model_copy(
                   update={"images": ()}))]
    assert encoded[0].length != encoded[1].length
    return collator.batch(encoded)


def _loss_and_grads(model, batch, labels, loss_head=None, extra=None):
    model.zero_grad(set_to_none=True)
    inputs = {**batch, **(extra or {})}
    if loss_head is None:
        out = model(**inputs)
        loss = token_loss_sum(out.logits, labels)
    else:
        out, loss = loss_head.run(model, inputs, labels)
    total = loss + (0.01 * out.aux_loss if extra else 0.0)
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), grads, out


CASES = [(f, "Full" if f == "nvila_lite" else "LoRA") for f in FAMILIES] + [("qwen3_vl", "Full"), ("qwen3_5_moe", "Full")]


@pytest.mark.parametrize("family,mode", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_the_label_only_loss_and_its_gradients_equal_the_full_logit_loss(family, mode):
    """fp32, two padded rows, several chunks: the summed answer-token loss and the gradient of every trainable
    parameter (LoRA adapters; full fine-tuning with a tied head, and an untied one with the router's aux loss) are
    the full-logit path's."""
    from vray.train.label_loss import CHUNKED, LossHead

    arch = registry.get(*REFERENCE[family])
    path = resolve_source(f"tiny:{family}")
    collator = Collator(load_processor(path), arch, None)
    torch.manual_seed(0)
    model, _ = prepare_for_training(path, arch, mode, "Float32", None, LoraBlock(dropout=0.0), torch.device("cpu"))
    model.train()
    head = model.get_output_embeddings() if mode == "Full" else model.get_base_model().get_output_embeddings()
    tied = head.weight is model.get_input_embeddings().weight
    if mode == "Full":
        assert tied == (family in ("qwen3_vl", "nvila_lite")) and head.weight.requires_grad
    batch = _two_rows(collator)
    labels = batch.pop("labels")
    scored = answer_tokens(labels)
    loss_head = LossHead.install(model, torch.device("cpu"), chunk_rows=3)
    assert loss_head.path == CHUNKED and scored > 2 * loss_head.chunk_rows  # several chunks, the last one short
    extra = {"output_router_logits": True} if arch.is_moe and mode == "Full" else None
    reference, ref_grads, ref_out = _loss_and_grads(model, batch, labels, extra=extra)
    loss, grads, out = _loss_and_grads(model, batch, labels, loss_head, extra=extra)
    assert out.logits.dim() == 0  # no logits were built for the batch
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    if extra:
        torch.testing.assert_close(out.aux_loss, ref_out.aux_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and grads
    if mode == "Full":
        assert any(n.endswith(("lm_head.weight", "embed_tokens.weight")) for n in grads)
    for name in ref_grads:  # to 1e-5 of each gradient's scale: fp32 sums in another order, nothing more
        error = float((grads[name] - ref_grads[name]).abs().max())
        assert error <= 1e-5 * max(1.0, float(ref_grads[name].abs().max())), (name, error)
    # Outside a training step the head is the plain Linear: evaluation's loss and full logits are unchanged.
    with torch.no_grad():
        plain = model(**batch, labels=labels)
    assert plain.logits.shape[:2] == labels.shape
    torch.testing.assert_close(plain.loss * 1.0, reference / scored, rtol=1e-5, atol=1e-5)


def test_the_chunked_head_loss_with_a_bias_matches_cross_entropy_and_scores_nothing_when_nothing_is_labelled():
    from vray.train.label_loss import chunked_linear_cross_entropy

    torch.manual_seed(0)
    rows = torch.randn(13, 8, requires_grad=True)
    head = torch.nn.Linear(8, 50)
    targets = torch.randint(0, 50, (13,))
    loss = chunked_linear_cross_entropy(rows, head.weight, head.bias, targets, chunk=5)
    (0.5 * loss).backward()
    got = (rows.grad, head.weight.grad, head.bias.grad)
    rows.grad = head.weight.grad = head.bias.grad = None
    reference = torch.nn.functional.cross_entropy(head(rows), targets, reduction="sum")
    (0.5 * reference).backward()
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-5)
    for mine, theirs in zip(got, (rows.grad, head.weight.grad, head.bias.grad)):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    head.zero_grad(set_to_none=True)
    empty = chunked_linear_cross_entropy(rows[:0], head.weight, head.bias, targets[:0], chunk=5)
    empty.backward()  # a micro-batch without answer tokens still backpropagates (zeros)
    assert float(empty.detach()) == 0.0 and float(head.weight.grad.abs().max()) == 0.0


def test_liger_runs_only_on_cuda_when_it_imports_and_a_wrapped_head_keeps_the_full_logits(monkeypatch):
    from vray.train import label_loss
    from vray.train.label_loss import CHUNKED, FULL, LIGER, LossHead, choose_path, liger_linear_cross_entropy

    head = torch.nn.Linear(8, 50, bias=False)
    calls = []

    def fake_liger(rows, weight, targets, **kwargs):  # what liger_fused_linear_cross_entropy computes
        calls.append(kwargs)
        logits = rows @ weight.t()
        return torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=kwargs["ignore_index"],
                                                 reduction=kwargs["reduction"])

    monkeypatch.setattr(label_loss, "_liger_loss", lambda: None)
    assert choose_path(head, torch.device("cpu"))[0] == CHUNKED
    path, message = choose_path(head, torch.device("cuda", 0))
    assert path == CHUNKED and "pip install 'vray[gpu]'" in message
    monkeypatch.setattr(label_loss, "_liger_loss", lambda: fake_liger)
    assert choose_path(head, torch.device("cpu"))[0] == CHUNKED
    assert choose_path(head, torch.device("cuda", 0))[0] == LIGER
    rows, targets = torch.randn(6, 8), torch.randint(0, 50, (6,))
    got = liger_linear_cross_entropy(rows, head.weight, None, targets)
    assert calls == [{"bias": None, "ignore_index": -100, "reduction": "sum", "accum_dtype": torch.float32}]
    torch.testing.assert_close(got, torch.nn.functional.cross_entropy(head(rows), targets, reduction="sum"))

    # A LoRA-wrapped LM head is not a plain Linear: the full-logit reference runs, and the log says so.
    from peft import LoraConfig, get_peft_model

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(50, 8)
            self.lm_head = torch.nn.Linear(8, 50, bias=False)

        def get_output_embeddings(self):
            return self.lm_head

        def forward(self, input_ids):
            from types import SimpleNamespace

            return SimpleNamespace(logits=self.lm_head(self.embed(input_ids)))

    model = get_peft_model(Tiny(), LoraConfig(r=2, target_modules=["lm_head"]))
    loss_head = LossHead.install(model, torch.device("cuda", 0))
    assert loss_head.path == FULL and "not a plain Linear" in loss_head.event()["message"]
    ids = torch.randint(0, 50, (2, 5))
    labels = ids.clone()
    labels[:, :2] = -100
    out, loss = loss_head.run(model, {"input_ids": ids}, labels)
    assert out.logits.shape == (2, 5, 50)
    torch.testing.assert_close(loss, token_loss_sum(out.logits, labels))


def test_the_head_loss_matmul_runs_in_the_autocast_dtype():
    from vray.train.label_loss import compute_dtype

    hidden, weight = torch.randn(2, 8), torch.randn(4, 8)
    assert compute_dtype(hidden, weight) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(hidden, weight) == torch.bfloat16
    assert compute_dtype(hidden, weight.to(torch.bfloat16)) == torch.bfloat16
