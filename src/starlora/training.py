"""Constraint-LoRA training: one adapter per round on everything labelled so far.

The loop runs on accelerate, so the same code serves the CPU, one GPU or several processes
(``accelerate launch``). Each call attaches a fresh LoRA adapter to the base model (the STAR
paper retrains from the base model every round) or, for a warm start, reloads a saved one.

Constraint LoRA (STAR paper, section 3.3) keeps the adapter from growing over-confident:

* decay on the zero-initialised ``lora_B`` matrices only: ``b_decay_mode="decoupled"`` is
  AdamW's decoupled decay on B's parameter group (as the authors' code), ``"l2"`` adds
  ``b_decay / 2 * sum ||B||^2`` to the loss, ``"none"`` turns it off; ``lora_A`` never decays;
* dropout on the input of the Gaussian-initialised ``lora_A`` (`LoraConfig.dropout`, set by
  `starlora.models.attach_lora`).

The loss is the mean cross-entropy over answer tokens only (prompt and padding are -100).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from starlora.config import LoraConfig, TrainingConfig
from starlora.errors import ConfigError, StarloraError
from starlora.io import atomic_folder
from starlora.models import attach_lora
from starlora.tasks import Example, Task

IGNORE = -100  # label of positions that carry no loss (prompt, padding)


@dataclass
class TrainResult:
    """What one round of training produced.

    `model` is the PeftModel (base model + trained adapter) in eval mode; `steps` counts
    optimizer steps; `train_tokens` counts non-padding tokens (prompt + answer) fed forward,
    summed over processes; `losses` holds the answer-token cross-entropy of each optimizer step
    (mean over its micro-batches, on this process, without the L2 penalty) and `lrs` the
    learning rate each optimizer step used.
    """

    model: Any
    steps: int
    seconds: float
    train_tokens: int
    final_loss: float
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)


# -- data -------------------------------------------------------------------------------------
def encode_example(
    task: Task, tokenizer: Any, ex: Example, max_length: int | None = None,
    answer: str | None = None, add_eos: bool = True,
) -> tuple[list[int], list[int]]:
    """``task.encode`` (answer ends with EOS unless `add_eos` is False), cut to `max_length`
    tokens from the left.

    The answer is kept whole when it fits (it is what training supervises); the prompt loses
    its oldest tokens first.
    """
    prompt, ans = task.encode(tokenizer, ex, answer=answer, add_eos=add_eos)
    if max_length is not None and len(prompt) + len(ans) > max_length:
        ans = ans[: max_length - 1]  # keep at least one prompt token to condition on
        prompt = prompt[len(prompt) - (max_length - len(ans)) :]
    return prompt, ans


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


# -- adapters ---------------------------------------------------------------------------------
def save_adapter(peft_model: Any, directory: str | Path) -> None:
    """Save the adapter as peft safetensors (``adapter_model.safetensors`` + config) to
    `directory`, atomically (`starlora.io.atomic_folder`)."""
    with atomic_folder(directory) as tmp:
        peft_model.save_pretrained(tmp, safe_serialization=True)


def load_adapter(model: Any, directory: str | Path) -> Any:
    """``PeftModel.from_pretrained(model, directory)`` in eval mode (adapter frozen)."""
    from peft import PeftModel

    _check_adapter_dir(directory)
    return PeftModel.from_pretrained(model, str(directory)).eval()


def remove_adapter(peft_model: Any) -> Any:
    """Strip the adapter without merging it and give back the plain base model (eval mode),
    whose weights are unchanged, so the next round can attach a fresh adapter to it."""
    return peft_model.unload().eval()


def _check_adapter_dir(directory: str | Path) -> None:
    if not (Path(directory) / "adapter_config.json").is_file():
        raise ConfigError(f"adapter {directory}: not a saved adapter (no adapter_config.json)")


def _with_adapter(model: Any, lora: LoraConfig, init_adapter: str | Path | None) -> Any:
    if init_adapter is None:
        return attach_lora(
            model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
            target_modules=lora.target_modules, init=lora.init,
        )
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel

    _check_adapter_dir(init_adapter)
    config = PeftLoraConfig.from_pretrained(str(init_adapter))
    config.lora_dropout = lora.dropout  # the dropout is this round's constraint, not the saved one
    return PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True, config=config)


# -- training ---------------------------------------------------------------------------------
def _mixed_precision(setting: str, device: torch.device) -> str:
    if setting != "auto":
        return setting
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"


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
    is seeded: the same seed and data give the same adapter. The schedule spans the real
    number of optimizer steps, ``ceil(ceil(n / batch_size) / grad_accum * epochs)`` (epochs
    may be fractional). An `accelerator` passed in is used as is (its mixed precision
    included) and has its prepared objects released at the end (``free_memory``).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    if not examples:
        raise StarloraError("training: no labelled examples to train on")
    device = next(model.parameters()).device
    if accelerator is None:
        settings = dict(mixed_precision=_mixed_precision(training.mixed_precision, device),
                        cpu=device.type == "cpu")
        try:
            accelerator = Accelerator(**settings)
        except ValueError:
            # accelerate keeps one process-wide state and refuses a new precision; a run (or a
            # test) that trains with another one in this process starts it afresh. The
            # distributed PartialState is kept.
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state()
            accelerator = Accelerator(**settings)
    accelerator.gradient_accumulation_steps = training.grad_accum

    set_seed(seed)  # before attaching: the Gaussian init of A draws from the global RNG
    peft_model = _with_adapter(model, lora, init_adapter)
    data = [encode_example(task, tokenizer, ex, training.max_length) for ex in examples]
    loader = DataLoader(
        data,
        batch_size=training.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=lambda pairs: collate(pairs, tokenizer.pad_token_id),
    )
    optimizer = build_optimizer(peft_model, training)

    steps_per_epoch = math.ceil(math.ceil(len(data) / training.batch_size) / training.grad_accum)
    total_steps = max(1, math.ceil(steps_per_epoch * training.epochs))
    warmup = math.ceil(training.warmup_ratio * total_steps)
    name = "constant_with_warmup" if training.scheduler == "constant" and warmup else training.scheduler
    scheduler = get_scheduler(
        name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps
    )
    wrapped, optimizer, loader, scheduler = accelerator.prepare(
        peft_model, optimizer, loader, scheduler
    )
    # a process sees 1/num_processes of the batches; the prepared scheduler steps accordingly
    local_steps = max(1, math.ceil(math.ceil(len(loader) / training.grad_accum) * training.epochs))
    trainable = [p for p in wrapped.parameters() if p.requires_grad]

    losses: list[float] = []
    lrs: list[float] = []
    window: list[float] = []
    tokens = 0
    bar = tqdm(
        total=local_steps, desc="train", unit="step",
        disable=not (progress and accelerator.is_local_main_process),
    )
    start = time.perf_counter()
    wrapped.train()
    for _ in range(math.ceil(training.epochs)):
        for batch in loader:
            # a fractional last epoch: drain the loader rather than break out of it, so that
            # accelerate sees the end of the epoch
            if len(losses) >= local_steps:
                continue
            with accelerator.accumulate(wrapped):
                loss = wrapped(**batch).loss
                window.append(loss.item())
                if training.b_decay_mode == "l2" and training.b_decay > 0:
                    loss = loss + b_penalty(wrapped, training.b_decay)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    lrs.append(optimizer.param_groups[0]["lr"])
                    if training.max_grad_norm:
                        accelerator.clip_grad_norm_(trainable, training.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            tokens += int(batch["attention_mask"].sum())
            if accelerator.sync_gradients:
                losses.append(sum(window) / len(window))
                window = []
                speed = tokens / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{speed:.0f}")
                bar.update()
    bar.close()
    seconds = time.perf_counter() - start

    total_tokens = int(accelerator.reduce(torch.tensor(tokens, device=accelerator.device), "sum"))
    trained = accelerator.unwrap_model(wrapped, keep_fp32_wrapper=False).eval()
    accelerator.free_memory()
    return TrainResult(
        model=trained,
        steps=len(losses),
        seconds=seconds,
        train_tokens=total_tokens,
        final_loss=losses[-1],
        losses=losses,
        lrs=lrs,
    )
