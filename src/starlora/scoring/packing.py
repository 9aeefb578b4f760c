"""Packed batches on CPU: several sequences back to back in one row, attention kept inside
each sequence, no padding computed.

`packed_attention` is registered with transformers' public ``AttentionInterface``; a model is
switched to it for one scoring call with its public ``set_attn_implementation`` and switched
back afterwards (`packed_attention_for`). The one private read, the model config's current
``_attn_implementation`` (transformers has no public getter), lives in `current_attention`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface

from starlora.models import unwrap_model

PACKED_ATTENTION = "starlora_packed_sdpa"
#: lengths of the sequences packed into the current one-row batch, read by `packed_attention`
_PACKED_LENGTHS: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "starlora_packed_lengths", default=None
)


def packed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal SDPA inside each sequence of a packed row: query/key/value ``[1, heads, sum(L),
    head_dim]`` are cut at the lengths in `_PACKED_LENGTHS`; returns ``[1, sum(L), heads,
    head_dim]`` as transformers' ``sdpa_attention_forward`` does. No padding is computed and no
    mask is built: each piece runs SDPA's causal kernel."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lengths = _PACKED_LENGTHS.get()
    if lengths is None or query.shape[0] != 1 or sum(lengths) != query.shape[2]:
        raise RuntimeError(f"{PACKED_ATTENTION}: called outside a packed scoring batch")
    out, start = [], 0
    for n in lengths:
        piece = slice(start, start + n)
        o, _ = sdpa_attention_forward(
            module, query[:, :, piece], key[:, :, piece], value[:, :, piece], None, **kwargs
        )
        out.append(o)
        start += n
    return torch.cat(out, dim=1), None


def current_attention(model: nn.Module) -> str | None:
    """The attention implementation `model` runs now. transformers has no public getter for
    it: this is the one read of the config's private ``_attn_implementation``."""
    return getattr(unwrap_model(model).config, "_attn_implementation", None)


def can_pack(model: nn.Module, longest: int) -> bool:
    """Whether `model` runs packed batches exactly: its attention is transformers' SDPA (which
    `packed_attention` calls per sequence) and no sequence is longer than a sliding window."""
    if current_attention(model) != "sdpa":
        return False
    config = unwrap_model(model).config
    window = getattr(config, "sliding_window", None)
    return not (window and getattr(config, "use_sliding_window", True) and longest > window)


@contextlib.contextmanager
def packed_attention_for(model: nn.Module) -> Iterator[None]:
    """`model` attends with `packed_attention` inside the block (its public
    ``set_attn_implementation``), and with its previous implementation afterwards."""
    lm = unwrap_model(model)
    previous = current_attention(model)
    lm.set_attn_implementation(PACKED_ATTENTION)
    try:
        yield
    finally:
        lm.set_attn_implementation(previous)


@contextlib.contextmanager
def packed_lengths(lengths: list[int]) -> Iterator[None]:
    """The lengths of the sequences packed into the row the model runs inside the block."""
    token = _PACKED_LENGTHS.set(lengths)
    try:
        yield
    finally:
        _PACKED_LENGTHS.reset(token)


AttentionInterface.register(PACKED_ATTENTION, packed_attention)
