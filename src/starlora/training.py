"""Constraint-LoRA training: one adapter per round on everything labelled so far.

The loop runs on accelerate, so the same code serves the CPU, one GPU or several processes
(``torchrun``, ``accelerate launch``). Each call attaches a fresh LoRA adapter to the base
model (the STAR paper retrains from the base model every round) or, for a warm start, reloads
a saved one.

Several processes train data-parallel on exactly the batches one process would use: each
takes its share of every batch (`ShareOfEachBatch`), its loss is weighted by its share of the
batch's answer tokens, and the gradient all-reduce averages them, so each optimizer step
follows the whole batch's mean loss, and there are as many steps as with one process. Only the
LoRA dropout masks differ (each process draws its own).

Constraint LoRA (STAR paper, section 3.3) keeps the adapter from growing over-confident:

* decay on the zero-initialised ``lora_B`` matrices only: ``b_decay_mode="decoupled"`` is
  AdamW's decoupled decay on B's parameter group (as the authors' code), ``"l2"`` adds
  ``b_decay / 2 * sum ||B||^2`` to the loss, ``"none"`` turns it off; ``lora_A`` never decays;
* dropout on the input of the Gaussian-initialised ``lora_A`` (`LoraConfig.dropout`, set by
  `starlora.adapters.attach_lora`).

The loss is the mean cross-entropy over answer tokens only (prompt and padding are -100).

`train_adapter` is three parts: `starlora.train_setup.setup_training` (the adapter, loader,
optimizer, schedule, precision and accelerator), `train_step` (one micro-batch: forward,
backward, and the optimizer step when gradients sync) and `train_loop` (the epochs, the
log of losses and learning rates, the progress bar).

Where the time goes, and how none is wasted (`benchmarks/training.py` measures it):

* the LM head runs only on the hidden states that predict answer tokens, in chunks of rows
  (`starlora.answer_loss.AnswerLoss`), not on every position of every sequence;
* batches group examples of similar length (`starlora.train_batches.LengthGroupedBatches`), so that
  right-padding stays a few percent of the tokens;
* ``mixed_precision: auto`` autocasts to bf16 where the hardware computes it natively (CUDA
  GPUs with bf16, CPUs with AVX512-BF16 or AMX; `resolve_mixed_precision`); the weights, the
  optimizer and the loss stay fp32.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from starlora import distributed as dist
from starlora.answer_loss import IGNORE
from starlora.attention import attention_kernels
from starlora.config import LoraConfig, TrainingConfig
from starlora.tasks import Example, Task
from starlora.train_setup import (
    TrainingSetup,
    build_optimizer,
    collate,
    encode_example,
    lora_b_params,
    resolve_mixed_precision,
    setup_training,
)

#: kept importable from here: the data and optimizer helpers live in `starlora.train_setup`
__all__ = ["IGNORE", "TrainResult", "b_penalty", "build_optimizer", "collate", "encode_example",
           "lora_b_params", "resolve_mixed_precision", "train_adapter", "train_loop",
           "train_step"]


@dataclass
class TrainResult:
    """What one round of training produced.

    `model` is the PeftModel (base model + trained adapter) in eval mode; `steps` counts
    optimizer steps; `train_tokens` counts non-padding tokens (prompt + answer) fed forward,
    summed over processes; `losses` holds the answer-token cross-entropy of each optimizer step
    (mean over its micro-batches, of the whole batch under several processes, without the L2
    penalty) and `lrs` the learning rate each optimizer step used.
    """

    model: Any
    steps: int
    seconds: float
    train_tokens: int
    final_loss: float
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    mixed_precision: str = "no"  # what the forward passes ran in: "no" (fp32), "bf16", "fp16"


# -- constraint terms -------------------------------------------------------------------------
def b_penalty(model: torch.nn.Module, b_decay: float) -> torch.Tensor:
    """Explicit L2 penalty ``b_decay / 2 * sum ||B||_F^2`` (scalar tensor, grads flow to B)."""
    return 0.5 * b_decay * sum(p.float().pow(2).sum() for p in lora_b_params(model))


# -- training ---------------------------------------------------------------------------------
def _share_weighted(accelerator: Any, loss: torch.Tensor,
                    labels: torch.Tensor) -> tuple[torch.Tensor, float]:
    """This process's mean answer-token loss `loss` of its share (labels [B, T]) weighted
    ``n_share / n_batch * world``, so that the all-reduce's average of the gradients is the
    gradient of the whole batch's mean; and that mean (for the log). Two scalar all-reduces."""
    n_share = (labels[:, 1:] != IGNORE).sum().to(torch.float64)
    n_batch = accelerator.reduce(n_share.clone(), "sum")
    total = accelerator.reduce((loss.detach().double() * n_share), "sum")
    weight = float(n_share / n_batch) * dist.world_size()
    return loss * weight, float(total / n_batch)


def train_step(s: TrainingSetup, batch: dict[str, torch.Tensor], training: TrainingConfig,
               lrs: list[float]) -> float:
    """One micro-batch (tensors [B, T] on `s.device`): forward, backward and, when the
    gradients sync, clipping, the optimizer and schedule steps (the learning rate used is
    appended to `lrs`). Returns the batch's mean answer-token loss (of the whole batch under
    several processes), without the L2 penalty."""
    accelerator, optimizer, scaler = s.accelerator, s.optimizer, s.scaler
    # forward and backward (a recomputed forward too) with the same attention kernels
    with accelerator.accumulate(s.wrapped), attention_kernels(s.device):
        with s.autocast():
            loss = s.wrapped(**batch)
        if s.world > 1:  # weight: this share's answer tokens / the batch's, x world
            loss, mean = _share_weighted(accelerator, loss, batch["labels"])
        else:
            mean = loss.item()
        if training.b_decay_mode == "l2" and training.b_decay > 0:
            loss = loss + b_penalty(s.wrapped, training.b_decay)
        accelerator.backward(loss if scaler is None else scaler.scale(loss))
        if accelerator.sync_gradients:
            lrs.append(optimizer.param_groups[0]["lr"])
            if scaler is not None:
                scaler.unscale_(optimizer)
            if training.max_grad_norm:
                accelerator.clip_grad_norm_(s.trainable, training.max_grad_norm)
        skipped = False
        if scaler is None:
            optimizer.step()  # accelerate makes it a no-op until gradients sync
            skipped = getattr(optimizer, "step_was_skipped", False)  # its fp16 scaler
        elif accelerator.sync_gradients:
            scale = scaler.get_scale()
            scaler.step(optimizer)  # skipped when the gradients are not finite,
            scaler.update()  # and then the scale shrinks
            skipped = scaler.get_scale() < scale
        if accelerator.sync_gradients and not skipped:  # the steps taken
            s.scheduler.step()
        optimizer.zero_grad()
    return mean


def train_loop(s: TrainingSetup, training: TrainingConfig,
               progress: bool) -> tuple[list[float], list[float], int, float]:
    """Every epoch of `s.loader`, `s.local_steps` optimizer steps in all. Returns the loss of
    each optimizer step (the mean over its micro-batches), the learning rate of each, the
    non-padding tokens fed forward by this process, and the seconds it took."""
    from tqdm.auto import tqdm

    losses: list[float] = []
    lrs: list[float] = []
    window: list[float] = []
    tokens = 0
    bar = tqdm(total=s.local_steps, desc="train", unit="step",
               disable=not (progress and dist.local_rank() == 0))
    start = time.perf_counter()
    s.wrapped.train()
    for _ in range(s.passes):
        for batch in s.loader:
            # a fractional last epoch: drain the loader rather than break out of it, so that
            # accelerate sees the end of the epoch
            if len(losses) >= s.local_steps:
                continue
            batch = {k: v.to(s.device, non_blocking=True) for k, v in batch.items()}
            window.append(train_step(s, batch, training, lrs))
            real = (batch["labels"] != IGNORE).any(dim=1)  # not a stand-in (ShareOfEachBatch)
            tokens += int(batch["attention_mask"][real].sum())
            if s.accelerator.sync_gradients:
                losses.append(sum(window) / len(window))
                window = []
                speed = tokens / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{speed:.0f}")
                bar.update()
    bar.close()
    return losses, lrs, tokens, time.perf_counter() - start


def train_adapter(
    model: Any,
    tokenizer: Any,
    task: Task,
    examples: list[Example],
    training: TrainingConfig,
    lora: LoraConfig,
    *,
    seed: int,
    init_adapter: str | Path | None = None,
    progress: bool = True,
    accelerator: Any = None,
) -> TrainResult:
    """Train a LoRA adapter on `examples` (answer tokens only) and return it on `model`.

    `model` is a plain (non-peft) base model already on its device; it gets a fresh adapter
    (or the saved one at `init_adapter`, trainable) and its own weights stay frozen. The run
    is seeded: the same seed and data give the same adapter. Batches group examples of similar
    length (`LengthGroupedBatches`). The schedule spans the real number of optimizer steps,
    ``training.steps`` or else ``ceil(ceil(n / batch_size) / grad_accum * epochs)`` (epochs may
    be fractional; `starlora.train_setup.optimizer_steps`).

    Precision: ``training.mixed_precision`` (`resolve_mixed_precision`) autocasts the forward
    pass with `torch.autocast` (fp16 adds a `torch.amp.GradScaler`); parameters, gradients and
    optimizer state stay in their dtype. An `accelerator` passed in is used as is and has its
    prepared objects released at the end (``free_memory``); if it, or the process's accelerate
    state (``accelerate launch --mixed_precision ...``), already has a mixed precision,
    accelerate autocasts (and scales) itself and ``training.mixed_precision`` is not applied.
    """
    s = setup_training(model, tokenizer, task, examples, training, lora, seed=seed,
                       init_adapter=init_adapter, accelerator=accelerator)
    losses, lrs, tokens, seconds = train_loop(s, training, progress)
    accelerator = s.accelerator
    total_tokens = int(accelerator.reduce(torch.tensor(tokens, device=accelerator.device), "sum"))
    trained = accelerator.unwrap_model(s.wrapped, keep_fp32_wrapper=False).model.eval()
    accelerator.free_memory()
    return TrainResult(
        model=trained,
        steps=len(losses),
        seconds=seconds,
        train_tokens=total_tokens,
        final_loss=losses[-1],
        losses=losses,
        lrs=lrs,
        mixed_precision=s.precision,
    )
