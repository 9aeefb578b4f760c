"""The answer-only training loss without full-vocabulary logits.

A causal LM's ``forward(labels=...)`` computes logits for every position of every sequence,
``[B, T, V]``, and then ignores all but the answer positions. Here the decoder body runs, the
hidden states that predict answer tokens are gathered (P rows), and only they go through the
LM head and the model's logit post-processing (Gemma 2 soft-capping, Cohere's scale), in chunks
of rows whose logits are never all kept for the backward pass. The loss is the mean
cross-entropy over answer tokens, the value the model's own loss gives.

Self-check: `checked_loss` computes the first batch of a round both ways, `AnswerLoss` and the
model's own ``forward(labels=...).loss`` (`ModelLoss`), and trains with `ModelLoss` when they
disagree (a logit post-processing `starlora.models.logit_transform` does not know, such as
Falcon-H1's ``lm_head_multiplier``), with a `LossFallbackWarning`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from starlora import distributed as dist
from starlora.attention import attention_kernels
from starlora.errors import LossFallbackWarning
from starlora.models import decoder_and_head, logit_transform, unwrap_model

IGNORE = -100  # label of positions that carry no loss (prompt, padding)

#: logits elements (answer rows x vocabulary) per chunk of `answer_cross_entropy`: 32M (128 MiB
#: in fp32, ~680 rows of SmolLM2's 49k vocabulary) on CPU and 64M on GPUs. On CPU small chunks
#: are slow (each head matmul goes over the whole [V, H] weight): for SmolLM2's head on 800
#: answer rows in bf16 (2 shared cores), ~85-row chunks took 2.3-2.5x the time of 400-800-row
#: ones, which took 0.55x the time of the unchunked head + cross-entropy
CPU_CHUNK_ELEMENTS = 1 << 25
GPU_CHUNK_ELEMENTS = 1 << 26


def _linear_head(head: nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) of a plain ``nn.Linear`` head in the dtype its matmul runs in (the
    autocast dtype under autocast, else that of `like`), cast once per batch: autocast does
    not cache casts of frozen weights, and for SmolLM2 a cast per chunk would move 28M
    values each time. None for any other head module."""
    if type(head) is not nn.Linear:
        return None
    device_type = like.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else like.dtype
    return head.weight.to(dtype), None if head.bias is None else head.bias.to(dtype)


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``transform(head(hidden))`` against `targets`, one chunk of
    `rows` rows at a time, with d(sum)/d(hidden) computed chunk by chunk in the forward pass.

    hidden [P, H], targets [P] -> scalar fp32 (fp64 for fp64 hidden states). Only the [P, H] gradient is kept for the
    backward pass, never the [P, V] logits or probabilities, so memory does not grow with
    answer tokens x vocabulary. The head's own parameters get no gradient (they are frozen).

    Per chunk: ``log p = log_softmax(z)`` in fp32 or better (read straight from the bf16 logits under
    autocast), loss ``-log p[target]``, and the gradient ``dz = p - onehot(target)`` in place.
    A plain ``nn.Linear`` head without a logit transform then takes ``dh = dz @ W`` directly;
    any other head or a transform goes through autograd from ``dz``.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module,
                transform: Callable[[torch.Tensor], torch.Tensor] | None, rows: int) -> torch.Tensor:
        want_grad = hidden.requires_grad
        grad = torch.empty_like(hidden) if want_grad else None
        exact = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for fp64
        total = torch.zeros((), dtype=exact, device=hidden.device)
        linear = _linear_head(head, hidden) if transform is None else None
        for s in range(0, hidden.shape[0], rows):
            t = targets[s : s + rows, None]  # [R, 1]
            if linear is not None:
                weight, bias = linear
                z = nn.functional.linear(hidden[s : s + rows].detach().to(weight.dtype), weight, bias)
            else:
                h = hidden[s : s + rows].detach().requires_grad_(want_grad)
                with torch.enable_grad():
                    z = head(h)
                    if transform is not None:
                        z = transform(z)
            logp = torch.log_softmax(z.detach(), dim=-1, dtype=exact)  # [R, V]
            total += logp.gather(1, t).sum().neg()
            if grad is None:
                continue
            dz = logp.exp_()
            dz.scatter_add_(1, t, torch.full_like(t, -1, dtype=dz.dtype))  # p - onehot
            if linear is not None:
                grad[s : s + rows] = dz.to(linear[0].dtype) @ linear[0]
            else:
                (grad[s : s + rows],) = torch.autograd.grad(z, h, dz.to(z.dtype))
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return grad * g.to(grad.dtype), None, None, None, None


def answer_cross_entropy(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: nn.Module,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy (nats; fp32 scalar, fp64 for fp64 hidden states) over the
    answer tokens of a batch.

    hidden [B, T, H]: the body's final hidden states, where position t predicts token t + 1;
    labels [B, T + 1] or [B, T]: token ids on answer tokens, `IGNORE` elsewhere (as `collate`
    makes them; the first column is never a target). Only the P rows at positions whose next
    label is an answer token go through `head` (and `transform`, the model's logit
    post-processing), so the logits are [P, V], not [B, T, V]. With `chunk_rows`, they are made
    `chunk_rows` rows at a time and never all kept for backward (`_ChunkedHeadCrossEntropy`);
    a head with trainable parameters always takes the plain path.
    """
    targets = labels[:, 1 : hidden.shape[1] + 1]
    keep = targets != IGNORE  # [B, T]
    rows = hidden[:, : targets.shape[1]][keep]  # [P, H]
    tgt = targets[keep]  # [P]
    if tgt.numel() == 0:  # nothing to learn from: a zero that still reaches every parameter
        return hidden.sum() * 0.0
    if chunk_rows is None or any(p.requires_grad for p in head.parameters()):
        z = head(rows)
        if transform is not None:
            z = transform(z)
        return nn.functional.cross_entropy(z.to(torch.promote_types(z.dtype, torch.float32)), tgt)
    total = _ChunkedHeadCrossEntropy.apply(rows, tgt, head, transform, max(1, chunk_rows))
    return total / tgt.numel()


class AnswerLoss(nn.Module):
    """The training forward pass: a causal LM's decoder body, then the LM head on answer
    positions only. ``forward(input_ids, attention_mask, labels)`` ([B, T] int64 each, as
    `collate` makes them) returns the mean answer-token cross-entropy, equal to the model's own
    ``model(**batch).loss`` without its [B, T, V] logits.

    Why a module and not a function of the model: this is what `train_adapter` hands to
    ``accelerator.prepare``. Under several processes accelerate wraps it in
    DistributedDataParallel, whose gradient all-reduce is set up by the wrapper's ``forward``;
    calling the body and head of the unwrapped model would skip it (no synchronised
    gradients), and calling the wrapped model's own forward computes the full logits this
    exists to avoid. `model` (the peft model) is its one registered submodule, so DDP sees
    each parameter once (tied embeddings included) and ``unwrap_model(...).model`` gives the
    peft model back.
    """

    def __init__(self, model: nn.Module, chunk_rows: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.chunk_rows = chunk_rows
        decoder_and_head(model)  # fail now, not at the first batch, for a model without a head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        body, head = decoder_and_head(self.model)
        # the last position predicts nothing, and (causal attention) nothing before it sees it
        hidden = body(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1],
                      use_cache=False)[0]  # [B, T - 1, H]
        return answer_cross_entropy(hidden, labels, head, logit_transform(self.model),
                                    self.chunk_rows)


class ModelLoss(nn.Module):
    """The training forward pass through the model's own ``forward(labels=...)``: the same
    mean answer-token cross-entropy as `AnswerLoss`, with full [B, T, V] logits. For models
    whose LM head is partitioned (DeepSpeed ZeRO-3), which `AnswerLoss` cannot read outside
    the head's own forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                         use_cache=False)
        if (labels[:, 1:] != IGNORE).any():
            return out.loss
        return out.logits.sum() * 0.0  # no answer tokens (a stand-in): 0, not the model's 0/0


def default_chunk_rows(model: nn.Module, device: torch.device) -> int:
    """Answer rows per head chunk: `CPU_CHUNK_ELEMENTS` (or `GPU_CHUNK_ELEMENTS`) logits."""
    _, head = decoder_and_head(model)
    vocab = getattr(head, "out_features", None) or head.weight.shape[0]
    budget = CPU_CHUNK_ELEMENTS if device.type == "cpu" else GPU_CHUNK_ELEMENTS
    return max(1, budget // vocab)


def loss_disagreement(model: nn.Module, batch: dict[str, torch.Tensor],
                      chunk_rows: int | None = None) -> str | None:
    """`AnswerLoss` and `ModelLoss` of `model` on `batch` (as `collate` makes it: labels are
    the answer tokens and `IGNORE` elsewhere, so both are the mean over the same answer
    tokens), deterministically: dropout off, no autocast, no gradients, the random streams
    left as they were. None when they agree within ``tol * max(1, |own|)``, tol = 1e-4 for
    float32/float64 weights and 2e-2 for bf16/fp16 ones (as `score_examples`' self-check), else
    the warning's one line."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                torch.no_grad(), attention_kernels(device):
            ours = AnswerLoss(model, chunk_rows)(**batch).item()
            own = ModelLoss(model)(**batch).item()
    finally:
        for m, training in modes:
            m.training = training
    dtype = next(model.parameters()).dtype
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2
    if abs(ours - own) <= tol * max(1.0, abs(own)):  # NaN disagrees
        return None
    return (f"{type(unwrap_model(model)).__name__}: the answer-only loss {ours:.6g} disagrees "
            f"with the model's own forward(labels=...).loss {own:.6g} on the first batch; "
            f"training with the model's own forward (full logits)")


def checked_loss(model: nn.Module, first: dict[str, torch.Tensor] | None,
                 chunk_rows: int | None) -> nn.Module:
    """The training forward pass for `model`: `AnswerLoss` (with `chunk_rows`) when it agrees
    with the model's own loss on `first` (`loss_disagreement`; None: no batch with answer
    tokens to check, nothing to learn either), else `ModelLoss` and a `LossFallbackWarning`.
    Under several processes the main process decides, so that every process trains the same
    way."""
    if first is None:
        return AnswerLoss(model, chunk_rows)
    problem = dist.agree(lambda: loss_disagreement(model, first, chunk_rows))
    if problem is None:
        return AnswerLoss(model, chunk_rows)
    if dist.is_main():
        warnings.warn(problem, LossFallbackWarning, stacklevel=2)
    return ModelLoss(model)
