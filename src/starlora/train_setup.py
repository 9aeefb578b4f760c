"""Setting up one round of training: the encoded examples and their loader, the adapter, the
optimizer and schedule, the precision and the accelerator (`setup_training`). The steps and
the loop that use them are in `starlora.training`."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from starlora import distributed as dist
from starlora import zero3
from starlora.adapters import attach_lora, check_adapter_dir
from starlora.answer_loss import IGNORE, ModelLoss, checked_loss, default_chunk_rows
from starlora.config import LoraConfig, TrainingConfig
from starlora.errors import ConfigError, StarloraError
from starlora.models import native_bf16, token_limit
from starlora.scoring.batching import fit
from starlora.seeds import process_seed
from starlora.tasks import Example, Task
from starlora.train_batches import LengthGroupedBatches, ShareOfEachBatch

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# -- data -------------------------------------------------------------------------------------
def encode_example(
    task: Task, tokenizer: Any, ex: Example, max_length: int | None = None,
    answer: str | None = None, add_eos: bool = True,
) -> tuple[list[int], list[int]]:
    """``task.encode`` (the answer closed by ``task.answer_end_ids`` unless `add_eos` is
    False), cut to `max_length` tokens from the left.

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


def check_pairs(pairs: list[tuple[list[int], list[int]]],
                max_tokens: int) -> list[tuple[list[int], list[int]]]:
    """The pairs of a batch that training's loss check (`starlora.answer_loss.checked_loss`)
    runs on: those with answer tokens, shortest first, each cut to `max_tokens` (`fit`), as
    many as keep the padded batch within `max_tokens` tokens (at least one, if any), so that the
    model's own full logits of the check stay within one head chunk's (`default_chunk_rows`)."""
    cut = sorted((fit(p, a, max(2, max_tokens)) for p, a in pairs if a),
                 key=lambda pa: len(pa[0]) + len(pa[1]))
    kept = cut[:1]
    for pair in cut[1:]:
        if (len(kept) + 1) * (len(pair[0]) + len(pair[1])) > max_tokens:
            break
        kept.append(pair)
    return kept


# -- the adapter and its optimizer ------------------------------------------------------------
def _is_lora_b(name: str) -> bool:
    return ".lora_B." in name or ".lora_embedding_B." in name


def lora_b_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable ``lora_B`` matrices of `model`."""
    return [p for n, p in model.named_parameters() if p.requires_grad and _is_lora_b(n)]


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


def with_adapter(model: Any, lora: LoraConfig, init_adapter: str | Path | None) -> Any:
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


# -- precision and the accelerator --------------------------------------------------------------
def deepspeed_config(accelerator: Any, training: TrainingConfig) -> None:
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
    bf16 (`starlora.models.native_bf16`), ``"no"`` (fp32) elsewhere; other settings
    are returned as they are."""
    if setting != "auto":
        return setting
    return "bf16" if native_bf16(device) else "no"


def make_accelerator(device: torch.device) -> Any:
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


@dataclass
class TrainingSetup:
    """Everything one round's steps use. `wrapped` is the prepared loss module around
    `peft_model`; `loader` yields this process's share of every batch; `local_steps` is the
    number of optimizer steps (the same in every process; `optimizer_steps`), `passes` the
    epochs over `loader` they take; `precision` is what the forward passes run in, autocast by
    us when `own_amp` (with `scaler` for fp16)."""

    accelerator: Any
    peft_model: Any
    wrapped: torch.nn.Module
    optimizer: Any
    scheduler: Any
    loader: Any
    device: torch.device
    precision: str
    own_amp: bool
    scaler: Any
    local_steps: int
    passes: int  # the last one may stop early
    trainable: list[torch.nn.Parameter]
    world: int

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward pass's autocast, when the precision is ours to apply."""
        if not self.own_amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_AMP_DTYPES[self.precision])


def setup_training(model: Any, tokenizer: Any, task: Task, examples: list[Example],
                   training: TrainingConfig, lora: LoraConfig, *, seed: int,
                   init_adapter: str | Path | None, accelerator: Any) -> TrainingSetup:
    """Attach the adapter to `model` and prepare the round's loader, optimizer, schedule,
    precision and accelerator (see `starlora.training.train_adapter` for what each means)."""
    from accelerate.data_loader import prepare_data_loader
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from transformers import get_scheduler

    if not examples:
        raise StarloraError("training: no labelled examples to train on")
    device = next(model.parameters()).device
    if accelerator is None:
        accelerator = make_accelerator(device)
    accelerator.gradient_accumulation_steps = training.grad_accum
    if accelerator.mixed_precision == "no":
        precision = resolve_mixed_precision(training.mixed_precision, device)
    else:
        precision = accelerator.mixed_precision  # accelerate applies it; we add nothing

    set_seed(seed)  # before attaching: the Gaussian init of A draws from the global RNG
    peft_model = with_adapter(model, lora, init_adapter)
    world, rank = dist.world_size(), dist.rank()  # accelerate says 1 and 0 for DeepSpeed on CPUs
    if rank > 0:  # the same init everywhere, but each process its own dropout masks
        torch.manual_seed(process_seed(seed, rank))
    limit = token_limit(model, training.max_length)  # capped at the model's positions
    data = [encode_example(task, tokenizer, ex, limit) for ex in examples]
    batches = LengthGroupedBatches([len(p) + len(a) for p, a in data], training.batch_size, seed)
    first = [data[i] for i in batches.batches(0)[0]]  # the whole first batch, before sharing
    if world > 1:  # a share of every batch, and stand-ins without answer tokens (see the class)
        batches = ShareOfEachBatch(batches, rank, world, stand_in=len(data))
        data = data + [(p + a, []) for p, a in data]
    loader = DataLoader(data, batch_sampler=batches,
                        collate_fn=lambda pairs: collate(pairs, tokenizer.pad_token_id))
    optimizer = build_optimizer(peft_model, training)

    # every process sees every batch (its share of it): as many steps as one process
    total_steps = optimizer_steps(training, len(batches))
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
    else:  # the answer-only loss, unless it disagrees with the model's own on the first batch
        chunk_rows = default_chunk_rows(peft_model, device)
        check = check_pairs(first, chunk_rows)
        step_model = checked_loss(
            peft_model, collate(check, tokenizer.pad_token_id) if check else None, chunk_rows)
    deepspeed_config(accelerator, training)
    wrapped, optimizer = accelerator.prepare(step_model, optimizer)
    # not accelerator.prepare: it would deal whole batches out to the processes, and its
    # scheduler would step once per process; the loader is already this process's share
    loader = prepare_data_loader(loader, num_processes=1, process_index=0, put_on_device=False)
    device = next(peft_model.parameters()).device  # where accelerate placed it
    own_amp = accelerator.mixed_precision == "no" and precision != "no"
    scaler = torch.amp.GradScaler(device.type) if own_amp and precision == "fp16" else None
    passes = math.ceil(total_steps / max(1, math.ceil(len(batches) / training.grad_accum)))
    return TrainingSetup(accelerator, peft_model, wrapped, optimizer, scheduler, loader, device,
                         precision, own_amp, scaler, total_steps, passes,
                         [p for p in wrapped.parameters() if p.requires_grad], world)


def optimizer_steps(training: TrainingConfig, batches: int) -> int:
    """Optimizer steps of one round whose labelled set makes `batches` batches an epoch:
    ``training.steps`` when set, else ``ceil(ceil(batches / grad_accum) * epochs)`` (epochs
    may be fractional); at least 1."""
    if training.steps is not None:
        return training.steps
    return max(1, math.ceil(math.ceil(batches / training.grad_accum) * training.epochs))
