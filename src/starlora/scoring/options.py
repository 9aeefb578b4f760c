"""`ScoringOptions`: how `score_examples` scores, as one validated value."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from starlora import zero3
from starlora.errors import ConfigError
from starlora.scoring.results import MEASURES

#: what ``scoring.dtype`` may name
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str | torch.dtype | None, device: torch.device,
                  weights: torch.dtype | None = None) -> torch.dtype | None:
    """The dtype a scorer on `device` computes in: None (the model's own) for None, bf16 for
    ``"auto"`` on devices with native bf16 (`starlora.models.native_bf16`),
    float32 for ``"auto"`` elsewhere, else the named one. Under DeepSpeed ZeRO-3 the weights'
    own dtype, `weights` (partitioned weights are not copied to another dtype)."""
    if zero3.enabled():
        return weights
    if name is None or isinstance(name, torch.dtype):
        return name
    if name == "auto":
        from starlora.models import native_bf16

        return torch.bfloat16 if native_bf16(device) else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"scoring.dtype: expected auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def example_seeds(seed: int, keys: Sequence[str], salt: int = 0) -> list[int]:
    """One 63-bit seed per example from a base `seed`, the example's key (its id, made unique
    when an id repeats, see `unique_keys`) and a `salt` (the MC pass): the same numbers
    whatever the order, batching or sharding of the examples."""
    out = []
    for key in keys:
        digest = hashlib.blake2b(f"{seed}\x1f{salt}\x1f{key}".encode(), digest_size=8).digest()
        out.append(int.from_bytes(digest, "little") >> 1)
    return out


def unique_keys(ids: Sequence[str]) -> list[str]:
    """`ids` with the n-th repeat of an id (n >= 1) suffixed ``#n`` (e.g. several sampled
    answers to one pool item), so that each occurrence gets its own random stream."""
    seen: dict[str, int] = {}
    keys = []
    for i in ids:
        n = seen.get(i, 0)
        seen[i] = n + 1
        keys.append(i if n == 0 else f"{i}#{n}")
    return keys


@dataclass(frozen=True)
class ScoringOptions:
    """How to score (every field has a default; `build` overrides some by name).

    measures: any of ``"pe"``, ``"me"``; the others come back as NaN and are not computed.
    mc_passes: K; with K > 1 the LoRA dropout (and the model's own dropout when
        `model_dropout`) samples a fresh mask per pass; scores are the mean over passes and
        ``pe_passes``/``me_passes`` hold the ``[N, K]`` per-pass values.
    batch_size: examples per batch, or ``"auto"``: as many as fit `max_tokens_per_batch`
        tokens (padded tokens in padded batches). Either way the limit halves on out-of-memory.
    max_tokens_per_batch: default 2048 on CPU, where larger batches only fall out of the
        cache, and 16384 on GPUs.
    max_length: prompt + answer tokens; longer prompts are cut on the left. Default: the
        model's maximum position count.
    seed: base seed of the dropout masks; default: drawn from torch's global generator (so
        ``torch.manual_seed`` makes scoring reproducible). On CPU each example's LoRA masks
        come from its own stream (`example_seeds` of its id and the pass), so its scores do not
        depend on the batch it lands in or on sharding between processes.
    dtype: what the forward passes compute in: None (the model's dtype), ``"float32"``,
        ``"bfloat16"`` or ``"auto"`` (`resolve_dtype`). A dtype other than the model's casts
        the model's weights to it for the call (restored after it).
    max_padding: padded batches only: the largest fraction of padding tokens a batch may hold.
        Default 0.1 on CPU, 0.5 on GPUs.
    packed: put each batch's sequences back to back in one row (no padding; attention stays
        within each sequence). Default: on CPU, for models whose attention is transformers'
        SDPA without a sliding window; padded batches otherwise.
    fixed_shape: None, or padded batches of fixed shapes (`starlora.scoring.batching.fixed_batch`):
        ``("rows", B)`` or ``("tokens", T)``; each sequence is padded to the next multiple of
        `BUCKET` tokens and batched with sequences of that width only, so that its bits do not
        depend on its batch-mates (how cached base scores are computed; not under ZeRO-3).
        Replaces `batch_size`, `max_tokens_per_batch`, `max_padding` and `packed`; an
        out-of-memory error raises `BatchTooLarge`.
    """

    measures: Sequence[str] = MEASURES
    mc_passes: int = 1
    model_dropout: bool = False
    batch_size: int | str = "auto"
    max_tokens_per_batch: int | None = None
    max_length: int | None = None
    seed: int | None = None
    max_padding: float | None = None
    packed: bool | None = None
    dtype: str | torch.dtype | None = None
    fixed_shape: tuple[str, int] | None = None

    def __post_init__(self) -> None:
        measures = tuple(self.measures)
        object.__setattr__(self, "measures", measures)
        if set(measures) - set(MEASURES) or not measures:
            raise ConfigError(f"scoring.measures: expected some of {MEASURES}, got {measures}")
        if self.mc_passes < 1:
            raise ConfigError(f"scoring.mc_passes: must be >= 1, got {self.mc_passes}")
        if isinstance(self.dtype, str) and self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(f"scoring.dtype: expected auto, {', '.join(DTYPES)}; "
                              f"got {self.dtype!r}")
        if self.batch_size != "auto" and not (
            isinstance(self.batch_size, int) and self.batch_size > 0
        ):
            raise ConfigError(
                f"scoring.batch_size: must be 'auto' or a positive int, got {self.batch_size!r}"
            )

    @classmethod
    def build(cls, options: ScoringOptions | None = None, **fields: Any) -> ScoringOptions:
        """`options` (default: the defaults) with `fields` replaced; an unknown name is a
        TypeError that lists the known ones."""
        unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            known = ", ".join(f.name for f in dataclasses.fields(cls))
            raise TypeError(f"unknown scoring option(s) {sorted(unknown)}; known: {known}")
        return dataclasses.replace(options or cls(), **fields)
