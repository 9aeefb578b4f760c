"""Label-free uncertainty: the model scores its own answers, so the pool needs none.

`score_own_answers` generates each example's answer with the model (greedy, or N samples at
temperature 1) and measures PE/ME of exactly those tokens; `base_answers` does the generating
for the frozen base model and caches it by content, like base scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from starlora.models import max_positions
from starlora.scoring.cache import (
    BaseScoreCache,
    base_cache_key,
    default_score_cache_dir,
    sequence_key,
)
from starlora.scoring.engine import score_examples
from starlora.scoring.lora_fastpath import adapter_disabled
from starlora.scoring.options import example_seeds, unique_keys
from starlora.scoring.results import Scores
from starlora.tasks import Example, Task


def own_answers(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    *,
    max_new_tokens: int,
    samples: int = 1,
    generation_batch_size: int = 16,
    seed: int = 0,
    max_length: int | None = None,
    progress: bool = True,
    desc: str = "generating answers",
) -> Any:
    """`model`'s own answers to `examples` (greedy; with `samples` N > 1, N answers at
    temperature 1, seeded per example from `seed` and its id): a `starlora.generation.Generated`
    of [len(examples) * samples] rows, grouped by example. Prompts are cut on the left to
    `max_length` (default: the model's maximum position count). The examples' answers are never
    read."""
    from starlora.generation import generate

    limit = max_length or max_positions(model)
    prompts = [task.prompt_ids(tokenizer, ex, limit) for ex in examples]
    return generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                    batch_size=generation_batch_size, samples=samples,
                    temperature=1.0 if samples > 1 else 0.0,
                    seeds=example_seeds(seed, unique_keys([ex.id for ex in examples]),
                                        salt=-1), progress=progress, desc=desc)


def score_own_answers(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    *,
    max_new_tokens: int,
    samples: int = 1,
    generation_batch_size: int = 16,
    seed: int = 0,
    max_length: int | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> tuple[Scores, Any]:
    """Label-free PE/ME: `model` answers each example itself (`own_answers`: greedy, or
    `samples` N > 1 at temperature 1 seeded from `seed`), and `score_examples` measures those
    tokens (MC dropout as `kwargs` ask). Returns (scores [N] with each measure the mean over
    the samples and per-pass values likewise, `starlora.generation.Generated` [N * S]).
    The examples' own answers are never read."""
    out = own_answers(model, tokenizer, task, examples, max_new_tokens=max_new_tokens,
                      samples=samples, generation_batch_size=generation_batch_size, seed=seed,
                      max_length=max_length, progress=progress,
                      desc=kwargs.pop("generation_desc", "generating answers"))
    repeated = [ex for ex in examples for _ in range(samples)]
    scores = score_examples(model, tokenizer, task, repeated, answer_ids=out.tokens, seed=seed,
                            max_length=max_length, progress=progress, **kwargs)
    return scores.mean_over(samples), out


def base_answers(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    *,
    fingerprint: str,
    dtype: torch.dtype,
    max_new_tokens: int,
    samples: int = 1,
    temperature: float = 0.0,
    batch_size: int = 16,
    progress: bool = True,
) -> list[list[int]]:
    """The frozen base model's own answers to `prompts` ([N] token-id lists): ``[N * samples]``
    generated token-id lists, grouped by prompt. Cached on disk like base scores, keyed by the
    prompt's tokens in a file keyed by the weights, dtype and generation settings; sampled
    answers are seeded by the prompt's key, so they do not depend on the run or the batch."""
    from starlora.generation import generate

    keys = [sequence_key(p, []) for p in prompts]

    def make(positions: list[int]) -> list[dict[str, Any]]:
        with adapter_disabled(model):
            out = generate(model, tokenizer, [prompts[i] for i in positions],
                           max_new_tokens=max_new_tokens, batch_size=batch_size,
                           samples=samples, temperature=temperature,
                           seeds=[int(keys[i][:8], 16) for i in positions],
                           progress=progress, desc="generating pool answers (base, cached)")
        return [{"answers": [out.tokens[j] for j in out.of(n)]} for n in range(len(positions))]

    if not fingerprint:  # weights without a fingerprint: generated every time
        return [a for r in make(list(range(len(prompts)))) for a in r["answers"]]
    key = {**base_cache_key(fingerprint, measures=(), dtype=dtype),
           "generation": {"max_new_tokens": max_new_tokens, "samples": samples,
                          "temperature": temperature}}
    cache = BaseScoreCache(default_score_cache_dir(), key)
    return [a for r in cache.records(keys, make) for a in r["answers"]]
