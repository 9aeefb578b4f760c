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

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from starlora import distributed as dist
from starlora import zero3
from starlora.adapters import attach_lora, check_adapter_dir
from starlora.answer_loss import IGNORE, AnswerLoss, ModelLoss, default_chunk_rows
from starlora.attention import attention_kernels
from starlora.config import LoraConfig, TrainingConfig
from starlora.errors import ConfigError, StarloraError
from starlora.models import cpu_has_native_bf16
from starlora.scoring.batching import fit
from starlora.tasks import Example, Task
from starlora.train_batches import LengthGroupedBatches, ShareOfEachBatch


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


# -- data -------------------------------------------------------------------------------------
def encode_example(
    task: Task, tokenizer: Any, ex: Example, max_length: int | None = None,
    answer: str | None = None, add_eos: bool = True,
) -> tuple[list[int], list[int]]:
    """``task.encode`` (answer ends with EOS unless `add_eos` is False), cut to `max_length`
    tokens from the left.

    The answer is kept whole when it fits (it is what training supervises); the prompt loses
    its oldest tokens first (`starlora.scoring.batching.fit`, the cut scoring makes too).
    """
    return fit(*task.encode(tokenizer, ex, answer=answer, add_eos=add_eos), max_length)


def collate(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``prompt + answer`` sequences to the longest in the batch.

    Returns ``input_ids``, ``attention_mask`` and ``labels``, each (batch, longest) int64;
    labels are the input ids on answer tokens and -100 on prompt and padding (the model
    shifts them by one position itself).
    """
    longest = max(len(p) + len(a) for p, a in pairs)
    ids = torch.full((len(pairs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(pairs), longest), dtype=torch.long)
    labels = torch.full((len(pairs), longest), IGNORE, dtype=torch.long)
    for i, (p, a) in enumerate(pairs):
        n = len(p) + len(a)
        ids[i, :n] = torch.tensor(p + a, dtype=torch.long)
        mask[i, :n] = 1
        labels[i, len(p) : n] = torch.tensor(a, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# -- constraint terms -------------------------------------------------------------------------
def _is_lora_b(name: str) -> bool:
    return ".lora_B." in name or ".lora_embedding_B." in name


def lora_b_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable ``lora_B`` matrices of `model`."""
    return [p for n, p in model.named_parameters() if p.requires_grad and _is_lora_b(n)]


def b_penalty(model: torch.nn.Module, b_decay: float) -> torch.Tensor:
    """Explicit L2 penalty ``b_decay / 2 * sum ||B||_F^2`` (scalar tensor, grads flow to B)."""
    return 0.5 * b_decay * sum(p.float().pow(2).sum() for p in lora_b_params(model))


def build_optimizer(model: torch.nn.Module, training: TrainingConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters in two groups: ``lora_B`` with weight decay
    ``b_decay`` when ``b_decay_mode == "decoupled"`` (0 otherwise), everything else (``lora_A``
    included) with none."""
    b, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (b if _is_lora_b(name) else rest).append(p)
    decay = training.b_decay if training.b_decay_mode == "decoupled" else 0.0
    groups = [{"params": b, "weight_decay": decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=training.lr)


def _with_adapter(model: Any, lora: LoraConfig, init_adapter: str | Path | None) -> Any:
    if init_adapter is None:
        return attach_lora(
            model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
            target_modules=lora.target_modules, init=lora.init,
        )
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel

    check_adapter_dir(init_adapter)
    config = PeftLoraConfig.from_pretrained(str(init_adapter))
    config.lora_dropout = lora.dropout  # the dropout is this round's constraint, not the saved one
    return PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True, config=config)


# -- training ---------------------------------------------------------------------------------
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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


def _deepspeed_config(accelerator: Any, training: TrainingConfig) -> None:
    """Under DeepSpeed, set the batch settings from `training`, the one owner of them (the
    loader is already this process's share of each batch, which accelerate is not given):
    the micro-batch (a share of ``training.batch_size``), the accumulation steps and the
    global batch; and the gradient clipping (``training.max_grad_norm``) where the DeepSpeed
    config says ``auto`` or nothing."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    config, world = plugin.deepspeed_config, dist.world_size()
    micro = max(1, training.batch_size // world)
    config.update(train_micro_batch_size_per_gpu=micro,
                  gradient_accumulation_steps=training.grad_accum,
                  train_batch_size=micro * training.grad_accum * world)
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = training.max_grad_norm or 0.0


def resolve_mixed_precision(setting: str, device: torch.device) -> str:
    """``training.mixed_precision`` for a model on `device`: ``auto`` is ``"bf16"`` on CUDA
    GPUs that compute bf16 natively (Ampere and later, not emulated) and on CPUs with native
    bf16 (`starlora.models.cpu_has_native_bf16`), ``"no"`` (fp32) elsewhere; other settings
    are returned as they are."""
    if setting != "auto":
        return setting
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "no"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "no"
    return "no"


def _make_accelerator(device: torch.device) -> Any:
    """An Accelerator for a model on `device`, without a mixed precision of its own.

    The precision is ours to apply (`torch.autocast` in `train_adapter`), so the process-wide
    accelerate state, which refuses a second precision, is never asked for one, and one
    process may train in bf16, then fp32, then bf16 again. When that state was set up earlier
    on a GPU and this model is on the CPU, the model is trained where it is (no device
    placement) rather than moved.
    """
    from accelerate import Accelerator

    if zero3.enabled():  # accelerate's DeepSpeed state, set up when the model was loaded
        return Accelerator()
    try:
        return Accelerator(cpu=device.type == "cpu")
    except ValueError:  # "AcceleratorState has already been initialized ... cpu=True"
        return Accelerator(device_placement=False)


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
    ``ceil(ceil(n / batch_size) / grad_accum * epochs)`` (epochs may be fractional).

    Precision: ``training.mixed_precision`` (`resolve_mixed_precision`) autocasts the forward
    pass with `torch.autocast` (fp16 adds a `torch.amp.GradScaler`); parameters, gradients and
    optimizer state stay in their dtype. An `accelerator` passed in is used as is and has its
    prepared objects released at the end (``free_memory``); if it, or the process's accelerate
    state (``accelerate launch --mixed_precision ...``), already has a mixed precision,
    accelerate autocasts (and scales) itself and ``training.mixed_precision`` is not applied.
    """
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    if not examples:
        raise StarloraError("training: no labelled examples to train on")
    device = next(model.parameters()).device
    if accelerator is None:
        accelerator = _make_accelerator(device)
    accelerator.gradient_accumulation_steps = training.grad_accum
    if accelerator.mixed_precision == "no":
        precision = resolve_mixed_precision(training.mixed_precision, device)
    else:
        precision = accelerator.mixed_precision  # accelerate applies it; we add nothing

    set_seed(seed)  # before attaching: the Gaussian init of A draws from the global RNG
    peft_model = _with_adapter(model, lora, init_adapter)
    world, rank = dist.world_size(), dist.rank()  # accelerate says 1 and 0 for DeepSpeed on CPUs
    if rank > 0:  # the same init everywhere, but each process its own dropout masks
        torch.manual_seed(seed + 1_000_003 * rank)
    data = [encode_example(task, tokenizer, ex, training.max_length) for ex in examples]
    batches = LengthGroupedBatches([len(p) + len(a) for p, a in data], training.batch_size, seed)
    if world > 1:  # a share of every batch, and stand-ins without answer tokens (see the class)
        batches = ShareOfEachBatch(batches, rank, world, stand_in=len(data))
        data = data + [(p + a, []) for p, a in data]
    loader = DataLoader(data, batch_sampler=batches,
                        collate_fn=lambda pairs: collate(pairs, tokenizer.pad_token_id))
    optimizer = build_optimizer(peft_model, training)

    steps_per_epoch = math.ceil(math.ceil(len(examples) / training.batch_size) / training.grad_accum)
    total_steps = max(1, math.ceil(steps_per_epoch * training.epochs))
    warmup = math.ceil(training.warmup_ratio * total_steps)
    name = "constant_with_warmup" if training.scheduler == "constant" and warmup else training.scheduler
    scheduler = get_scheduler(
        name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps
    )
    if zero3.enabled():  # the LM head's weight is whole only inside its own forward
        if training.b_decay_mode == "l2" and training.b_decay > 0:
            raise ConfigError("training.b_decay_mode: l2 reads every lora_B weight outside "
                              "its module, which DeepSpeed ZeRO-3 partitions; use decoupled")
        step_model: torch.nn.Module = ModelLoss(peft_model)
    else:
        step_model = AnswerLoss(peft_model, chunk_rows=default_chunk_rows(peft_model, device))
    _deepspeed_config(accelerator, training)
    wrapped, optimizer = accelerator.prepare(step_model, optimizer)
    # not accelerator.prepare: it would deal whole batches out to the processes, and its
    # scheduler would step once per process; the loader is already this process's share
    from accelerate.data_loader import prepare_data_loader

    loader = prepare_data_loader(loader, num_processes=1, process_index=0, put_on_device=False)
    device = next(peft_model.parameters()).device  # where accelerate placed it
    own_amp = accelerator.mixed_precision == "no" and precision != "no"
    scaler = torch.amp.GradScaler(device.type) if own_amp and precision == "fp16" else None

    def autocast() -> contextlib.AbstractContextManager:
        if not own_amp:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=_AMP_DTYPES[precision])

    # every process sees every batch (its share of it): as many steps as one process
    local_steps = max(1, math.ceil(math.ceil(len(loader) / training.grad_accum) * training.epochs))
    trainable = [p for p in wrapped.parameters() if p.requires_grad]

    losses: list[float] = []
    lrs: list[float] = []
    window: list[float] = []
    tokens = 0
    bar = tqdm(
        total=local_steps, desc="train", unit="step",
        disable=not (progress and dist.local_rank() == 0),
    )
    start = time.perf_counter()
    wrapped.train()
    for _ in range(math.ceil(training.epochs)):
        for batch in loader:
            # a fractional last epoch: drain the loader rather than break out of it, so that
            # accelerate sees the end of the epoch
            if len(losses) >= local_steps:
                continue
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            # forward and backward (a recomputed forward too) with the same attention kernels
            with accelerator.accumulate(wrapped), attention_kernels(device):
                with autocast():
                    loss = wrapped(**batch)
                if world > 1:  # weight: this share's answer tokens / the batch's, x world
                    loss, mean = _share_weighted(accelerator, loss, batch["labels"])
                    window.append(mean)
                else:
                    window.append(loss.item())
                if training.b_decay_mode == "l2" and training.b_decay > 0:
                    loss = loss + b_penalty(wrapped, training.b_decay)
                accelerator.backward(loss if scaler is None else scaler.scale(loss))
                if accelerator.sync_gradients:
                    lrs.append(optimizer.param_groups[0]["lr"])
                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    if training.max_grad_norm:
                        accelerator.clip_grad_norm_(trainable, training.max_grad_norm)
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
                    scheduler.step()
                optimizer.zero_grad()
            real = (batch["labels"] != IGNORE).any(dim=1)  # not a stand-in (ShareOfEachBatch)
            tokens += int(batch["attention_mask"][real].sum())
            if accelerator.sync_gradients:
                losses.append(sum(window) / len(window))
                window = []
                speed = tokens / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{speed:.0f}")
                bar.update()
    bar.close()
    seconds = time.perf_counter() - start

    total_tokens = int(accelerator.reduce(torch.tensor(tokens, device=accelerator.device), "sum"))
    trained = accelerator.unwrap_model(wrapped, keep_fp32_wrapper=False).model.eval()
    accelerator.free_memory()
    return TrainResult(
        model=trained,
        steps=len(losses),
        seconds=seconds,
        train_tokens=total_tokens,
        final_loss=losses[-1],
        losses=losses,
        lrs=lrs,
        mixed_precision=precision,
    )
