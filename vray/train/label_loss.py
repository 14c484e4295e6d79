"""The training loss without the full logits: the LM head runs only at the scored positions, a chunk at a time.

`LossHead.install(model, device)` replaces the forward of the model's output embedding on the instance, so the
engines' module hooks (ZeRO-3's gathering, FSDP2's unsharding and gradient reduction) still run around it, and
whatever the family's forward does around its head (`logits_to_keep`, the MoE router's aux loss) stays as it is.
During `LossHead.run(module, inputs, labels)` that forward takes the hidden states [:, :-1] at the positions whose
next token is scored (`labels[:, 1:] != -100`) and returns their summed fp32 cross-entropy, which the model hands
back as its `logits`. The logits are built `loss_chunk_rows(vocab)` rows at a time (the planner's logits term follows
the same rule) and no chunk's logits are kept for backward: the gradients of the hidden rows, and of the head's
weight when it is trained, are computed chunk by chunk in the forward and scaled in the backward. On CUDA, Liger's
fused linear cross-entropy does the same when liger-kernel is installed (`pip install 'vray[gpu]'`). Outside `run`
(evaluation, generation, serving) the head is the plain Linear it was.

The logits' precision is the full-logit path's: the matmul in the autocast dtype when autocast is on (else the
weight's dtype), the cross-entropy in fp32. A head that is not a plain Linear (a LoRA-wrapped lm_head) keeps the
full-logit reference, `vray.train.loss.token_loss_sum`.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from vray.data.collate import IGNORE_INDEX
from vray.models.loss_chunks import loss_chunk_rows
from vray.train.loss import token_loss_sum

LIGER, CHUNKED, FULL = "liger", "chunked", "full"


def _liger_loss() -> Any:
    """Liger's fused linear cross-entropy, or None when liger-kernel is not installed (or does not import)."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception:  # noqa: BLE001 - missing, or built for another torch / triton: the chunked loss runs
        return None
    return liger_fused_linear_cross_entropy


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output embedding (the LM head), under a peft wrapper or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    get = getattr(base, "get_output_embeddings", None)
    return get() if get is not None else None


def choose_path(head: nn.Module | None, device: torch.device) -> tuple[str, str]:
    """Which loss the training step runs, and why: Liger's fused kernel on CUDA when it imports, the chunked
    label-only loss otherwise, the full-logit loss for a head that is not a plain Linear."""
    if head is None or not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        kind = "no output embedding" if head is None else type(head).__name__
        return FULL, (f"the LM head is not a plain Linear ({kind}): the loss builds the logits at every position, "
                      "in full")
    if device.type == "cuda":
        if _liger_loss() is not None:
            return LIGER, "label-only loss: Liger's fused linear cross-entropy"
        return CHUNKED, ("label-only loss, chunked in PyTorch: liger-kernel is not installed "
                         "(pip install 'vray[gpu]' for its fused kernel)")
    return CHUNKED, "label-only loss, chunked in PyTorch"


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The logits' matmul dtype of the full-logit path: autocast's when it is on, else the weight's."""
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return weight.dtype


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `rows @ weight.T (+ bias)` against `targets`, `chunk` rows of logits at a time. The
    gradients are computed in the forward, chunk by chunk, so no logits outlive their chunk; the backward only
    scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                chunk: int, dtype: torch.dtype, grads: bool) -> torch.Tensor:
        need_rows, need_weight = grads and ctx.needs_input_grad[0], grads and ctx.needs_input_grad[1]
        need_bias = grads and bias is not None and ctx.needs_input_grad[2]
        with torch.autocast(rows.device.type, enabled=False):
            h_all = rows.to(dtype)
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            total = torch.zeros((), dtype=torch.float32, device=rows.device)
            grad_rows = torch.empty_like(h_all) if need_rows else None
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
            grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
            for start in range(0, h_all.shape[0], chunk):
                h, t = h_all[start:start + chunk], targets[start:start + chunk, None]
                z = F.linear(h, w, b).float()  # one fp32 buffer per chunk (the matmul's own, in fp32)
                picked = z.gather(1, t)
                top = z.amax(dim=1, keepdim=True)
                z.sub_(top).exp_()
                norm = z.sum(dim=1, keepdim=True)
                total += (norm.log() + top - picked).sum()
                if not (need_rows or need_weight or need_bias):
                    continue
                z.div_(norm)  # softmax; minus one at the target: the logits' gradient
                z.scatter_add_(1, t, torch.full_like(picked, -1.0))
                g = z.to(dtype)
                if need_rows:
                    torch.matmul(g, w, out=grad_rows[start:start + chunk])
                if need_weight and dtype == torch.float32:
                    grad_weight.addmm_(g.t(), h)
                elif need_weight:
                    grad_weight.add_(g.t() @ h)  # one (V, H) product in `dtype`, accumulated in fp32
                if need_bias:
                    grad_bias += g.float().sum(dim=0)
                del z, g
        ctx.rows_dtype, ctx.weight_dtype = rows.dtype, weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.grads = (grad_rows, grad_weight, grad_bias)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        grad_rows, grad_weight, grad_bias = ctx.grads
        ctx.grads = (None, None, None)
        scale = grad_out.float()
        out_rows = (grad_rows.float() * scale).to(ctx.rows_dtype) if grad_rows is not None else None
        out_weight = grad_weight.mul_(scale).to(ctx.weight_dtype) if grad_weight is not None else None
        out_bias = grad_bias.mul_(scale).to(ctx.bias_dtype) if grad_bias is not None else None
        return out_rows, out_weight, out_bias, None, None, None, None


def chunked_linear_cross_entropy(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """The summed fp32 cross-entropy of the head at `rows` (scored hidden rows, (N, H)) against `targets` (N,)."""
    dtype = compute_dtype(rows, weight)
    return _ChunkedLinearCrossEntropy.apply(rows, weight, bias, targets, max(1, chunk), dtype, torch.is_grad_enabled())


def liger_linear_cross_entropy(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               targets: torch.Tensor) -> torch.Tensor:
    """The same sum through Liger's fused kernel (it chunks on its own), with the matmul in the same dtype and the
    weight's gradient accumulated in fp32."""
    fused = _liger_loss()
    dtype = compute_dtype(rows, weight)
    return fused(rows.to(dtype), weight.to(dtype), targets, bias=bias.to(dtype) if bias is not None else None,
                 ignore_index=IGNORE_INDEX, reduction="sum", accum_dtype=torch.float32).float()


class LossHead:
    """The loss of the training step, installed on a model's LM head (see the module's docstring)."""

    def __init__(self, head: nn.Module | None, path: str, message: str, chunk_rows: int):
        self.head = head
        self.path = path
        self.message = message
        self.chunk_rows = chunk_rows
        self._local = threading.local()  # the labels of the forward in flight, on this thread

    @classmethod
    def install(cls, model: nn.Module, device: torch.device, chunk_rows: int | None = None) -> LossHead:
        """Choose the path for `model` on `device` and install it on the model's head (`chunk_rows` overrides
        `loss_chunk_rows(vocab)`, for tests)."""
        head = output_head(model)
        path, message = choose_path(head, device)
        rows = chunk_rows or (loss_chunk_rows(head.out_features) if path != FULL else 0)
        loss_head = cls(head, path, message, rows)
        if path != FULL:
            original = head.forward
            head.forward = lambda hidden: loss_head._forward(original, hidden)  # type: ignore[method-assign]
        return loss_head

    def event(self) -> dict[str, Any]:
        """The metrics-log record that says which loss runs."""
        return {"event": "loss_head", "path": self.path, "message": self.message}

    @contextlib.contextmanager
    def _scoring(self, labels: torch.Tensor) -> Iterator[dict[str, Any]]:
        state = {"labels": labels, "used": False}
        self._local.state = state
        try:
            yield state
        finally:
            self._local.state = None

    def run(self, module: Any, inputs: dict[str, Any], labels: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """One training forward: the model's output and the summed answer-token cross-entropy (fp32) of the batch."""
        if self.path == FULL:
            out = module(**inputs)
            return out, token_loss_sum(out.logits, labels)
        with self._scoring(labels) as state:
            out = module(**inputs)
        if state["used"]:
            return out, out.logits
        return out, token_loss_sum(out.logits, labels)

    def _forward(self, original: Any, hidden: torch.Tensor) -> torch.Tensor:
        state = getattr(self._local, "state", None)
        labels = state["labels"] if state is not None else None
        if labels is None or hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(labels.shape):
            return original(hidden)  # not a training forward, or not the full sequence: the plain head
        state["labels"] = None  # once per forward
        state["used"] = True
        targets = labels[:, 1:].to(hidden.device)
        scored = targets != IGNORE_INDEX
        rows = hidden[:, :-1][scored]
        head = self.head
        if self.path == LIGER and rows.is_cuda and rows.shape[0] and torch.is_grad_enabled():
            return liger_linear_cross_entropy(rows, head.weight, head.bias, targets[scored])
        return chunked_linear_cross_entropy(rows, head.weight, head.bias, targets[scored], self.chunk_rows)
