"""`ScoringOptions`: how `score_examples` scores, as one validated value."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from starlora.errors import ConfigError
from starlora.scoring.results import MEASURES


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
        ``torch.manual_seed`` makes scoring reproducible).
    max_padding: padded batches only: the largest fraction of padding tokens a batch may hold.
        Default 0.1 on CPU, 0.5 on GPUs.
    packed: put each batch's sequences back to back in one row (no padding; attention stays
        within each sequence). Default: on CPU, for models whose attention is transformers'
        SDPA without a sliding window; padded batches otherwise.
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

    def __post_init__(self) -> None:
        measures = tuple(self.measures)
        object.__setattr__(self, "measures", measures)
        if set(measures) - set(MEASURES) or not measures:
            raise ConfigError(f"scoring.measures: expected some of {MEASURES}, got {measures}")
        if self.mc_passes < 1:
            raise ConfigError(f"scoring.mc_passes: must be >= 1, got {self.mc_passes}")
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
