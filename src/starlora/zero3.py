"""DeepSpeed ZeRO stage 3: the one module that knows about it.

Under ``accelerate launch --config_file configs/accelerate/deepspeed-zero3.yaml`` every
process holds only its share of each weight. A whole weight exists only for the moment a
module runs: DeepSpeed's hooks gather it before the module's ``forward`` and free it after.
So:

* the model is loaded partitioned: `prepare_loading`, called by `starlora.models.load_model`,
  sets up accelerate's DeepSpeed state before ``from_pretrained``, and transformers then loads
  each weight straight into its shares (``zero3_init_flag: true``, which starlora requires;
  the tiny test models are built whole, with the weights of one process, and partitioned by
  the first engine);
* training is accelerate's DeepSpeed engine (`starlora.training`);
* outside training, forward passes run inside `forward_hooks`, a DeepSpeed engine without an
  optimizer that exists only for their duration. Every process must run the same number of
  forward passes, because each pass gathers every weight from every process: scoring then
  uses padded batches of a fixed number of examples (`starlora.scoring.engine`), generation
  passes ``synced_gpus=True``, and shares of the pool are padded to equal sizes
  (`starlora.distributed.shard`);
* saving an adapter gathers its weights first: `gathered`.

`enabled` is the one test the rest of starlora makes. Without DeepSpeed every function here
is a no-op and nothing imports ``deepspeed``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from starlora import distributed as dist
from starlora.errors import ConfigError

_ACCELERATOR: Any = None  # holds accelerate's DeepSpeed state (and transformers' reference)
_ACTIVE: set[int] = set()  # ids of models inside `forward_hooks`


def requested() -> bool:
    """Whether the launcher asked for ZeRO stage 3 (``accelerate launch`` with a DeepSpeed
    config of ``zero_stage: 3``, which it passes to the processes as environment
    variables)."""
    return (dist.launched_with_deepspeed()
            and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "") == "3")


def enabled() -> bool:
    """Whether models load and run partitioned (transformers' own test, true once
    `prepare_loading` has set up accelerate's ZeRO-3 state)."""
    if _ACCELERATOR is None:
        return False
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def lockstep() -> bool:
    """Whether every process must run as many forward passes as the others, each in its
    turn: weights partitioned (`enabled`) over several processes. A process that skips a
    pass the others run (a cached record, a pair that needs no pass) leaves them waiting."""
    return enabled() and dist.world_size() > 1


def prepare_loading() -> None:
    """Under a ZeRO-3 launch, join the process group and set up accelerate's DeepSpeed state
    (once), so that models loaded from now on are partitioned as they load. No-op
    otherwise."""
    global _ACCELERATOR
    if not requested() or _ACCELERATOR is not None:
        return
    if os.environ.get("ACCELERATE_DEEPSPEED_ZERO3_INIT", "").lower() not in ("true", "1"):
        raise ConfigError("DeepSpeed ZeRO stage 3: starlora needs zero3_init_flag: true in the "
                          "accelerate config (each weight loaded straight into its shares)")
    dist.setup()
    from accelerate import Accelerator

    _ACCELERATOR = Accelerator()
    if not enabled():  # pragma: no cover - accelerate sets transformers' reference itself
        raise ConfigError("DeepSpeed ZeRO stage 3 was requested but transformers does not see "
                          "it (accelerate did not set up its DeepSpeed state)")


def _inference_config(model: torch.nn.Module) -> dict[str, Any]:
    dtype = next(model.parameters()).dtype
    return {
        "train_micro_batch_size_per_gpu": 1,
        "train_batch_size": dist.world_size(),
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
    }


@contextlib.contextmanager
def forward_hooks(model: torch.nn.Module) -> Iterator[None]:
    """Forward passes of a partitioned `model` (a peft model or a plain one) outside training:
    DeepSpeed's gathering hooks for the duration of the block (re-entrant; a no-op without
    ZeRO-3). Every process must run the same number of forward passes inside it."""
    if not enabled() or id(model) in _ACTIVE:
        yield
        return
    import deepspeed

    engine = deepspeed.initialize(model=model, config=_inference_config(model))[0]
    _ACTIVE.add(id(model))
    try:
        yield
    finally:
        _ACTIVE.discard(id(model))
        engine.destroy()  # removes the gathering hooks, not the engine's own two
        for name in ("module_forward_pre_hook", "module_forward_post_hook"):
            handle = getattr(engine, name, None)
            if handle is not None:
                handle.remove()


def inference_mode() -> contextlib.AbstractContextManager:
    """``torch.inference_mode()``, or ``torch.no_grad()`` under ZeRO-3: weights gathered in
    inference mode would become inference tensors, which training cannot use afterwards."""
    return torch.no_grad() if enabled() else torch.inference_mode()


def gathered(params: Iterable[torch.nn.Parameter]) -> contextlib.AbstractContextManager:
    """The whole of each parameter in `params`, on every process, for the duration of the
    block (read-only; every process must enter it); a no-op without ZeRO-3."""
    if not enabled():
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)


def held_elements(model: torch.nn.Module) -> tuple[int, int]:
    """(parameter elements this process holds, elements of the whole model): its shares
    under ZeRO-3 (DeepSpeed keeps them in ``param.ds_tensor``, the whole size in
    ``param.ds_numel``), every element otherwise. Shared (tied) weights count once."""
    params = {id(p): p for p in model.parameters()}.values()
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    whole = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    return held, whole
