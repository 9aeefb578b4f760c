"""Label-free uncertainty: the model scores its own answers, so the pool needs none.

`score_own_answers` generates each example's answer with the model (greedy, or N samples at
temperature 1) and measures PE/ME of exactly those tokens; `base_answers` does the generating
for the frozen base model and caches it by content, like base scores.

Scoring while generating: the decoding step that chose an answer token already made the
model's logits at that position, so the generation measures the first pass (PE: -log p of
each generated token, ME: the entropy at each answer position, from the raw logits in the
model's dtype; `starlora.generation.decode`). `score_generated` takes that first pass
from the generation and runs forward passes only for MC passes 2..K (MC dropout, the masks of
those passes), so with ``mc_passes: 1`` scoring the own answers costs no forward pass beyond
the generation. The first pass is the deterministic one (no dropout: the model generated in
eval mode). A pair that does not fit `max_length` is scored as `score_examples` scores it
(its prompt cut on the left), by a forward pass, since the generation saw the whole prompt; so
is a pair whose prompt the generation cut to leave room for its answer in the model's
positions (`starlora.models.prompt_room`), which the scorer sees whole.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from starlora import distributed as dist
from starlora import zero3
from starlora.models import prompt_room, prompt_window, stop_tokens, token_limit
from starlora.scoring.base_scores import score_base
from starlora.scoring.batching import BUCKET, encode_pairs
from starlora.scoring.cache import (
    BaseScoreCache,
    base_cache_key,
    default_score_cache_dir,
    sequence_key,
)
from starlora.scoring.engine import score_examples
from starlora.scoring.lora_fastpath import adapter_disabled
from starlora.scoring.options import ScoringOptions, example_seeds, unique_keys
from starlora.scoring.results import Scores
from starlora.tasks import Example, Task

#: generated rows a batch where the caller gives no size (greedy rows; sampled: in groups of
#: ``GENERATION_BATCH // samples`` prompts where the caller groups them)
GENERATION_BATCH = 16


def own_answers(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    *,
    max_new_tokens: int,
    samples: int = 1,
    generation_batch_size: int = GENERATION_BATCH,
    seed: int = 0,
    max_length: int | None = None,
    progress: bool = True,
    desc: str = "generating answers",
    measure: bool = True,
    groups: Sequence[int] | None = None,
) -> Any:
    """`model`'s own answers to `examples` (greedy; with `samples` N > 1, N answers at
    temperature 1, seeded per example from `seed` and its id, a batch per example or per
    group of `groups`, as `starlora.generation.generate` takes them): a
    `starlora.generation.Generated` of [len(examples) * samples] rows, grouped by example.
    Prompts are cut on the left to `max_length` capped at the model's maximum position count
    (`starlora.models.token_limit`), and by `generate` to leave room for `max_new_tokens`.
    With `measure`, the generation measures the first scoring pass too
    (``Generated.nll``/``entropy``, for `score_generated`). The examples' answers are never
    read."""
    from starlora.generation import generate

    keep = prompt_window(model, max_length, max_new_tokens)  # room left for the answers
    prompts = [task.prompt_ids(tokenizer, ex, keep) for ex in examples]
    return generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                    batch_size=generation_batch_size, samples=samples,
                    temperature=1.0 if samples > 1 else 0.0,
                    seeds=example_seeds(seed, unique_keys([ex.id for ex in examples]),
                                        salt=-1), progress=progress, desc=desc,
                    measure=measure, groups=groups)


def _first_pass(
    model: nn.Module, tokenizer: Any, task: Task, examples: Sequence[Example],
    tokens: Sequence[Sequence[int]], measured: tuple[np.ndarray, np.ndarray] | None,
    max_length: int | None, forward: Callable[[list[Example], list[list[int]]], Scores],
    room: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The deterministic first pass over (example, generated `tokens`) pairs: the PE and ME
    sums the generation `measured` ([N] each) where the scorer would see the very tokens the
    generation saw (prompt + answer shorter than `max_length`, and the prompt no longer than
    the generation's `room`, its `Generated.prompt_room`: nothing cut); the other pairs, and
    every pair when the generation measured nothing, by `forward` (examples, answers) ->
    `Scores`; under ZeRO-3 (`zero3.lockstep`) every pair of every process is passed when one
    process has a pair to redo, and only the pairs to redo take the pass's values. Returns (pe [N], me [N], answer tokens scored [N]) float64/int64."""
    limit = token_limit(model, max_length)
    seqs = encode_pairs(model, tokenizer, task, examples, limit, tokens)
    n_tok = np.array([len(a) for _, a in seqs], np.int64)
    pe = np.full(len(seqs), np.nan)
    me = np.full(len(seqs), np.nan)
    # a cut pair is exactly `limit` tokens long (`batching.fit`): shorter ones are uncut
    redo = [i for i, (p, a) in enumerate(seqs) if measured is None or len(p) + len(a) >= limit
            or (room is not None and len(p) > room)]
    if measured is not None:
        pe[:], me[:] = measured
    passes = redo
    if zero3.lockstep() and dist.any_process(bool(redo)):
        passes = list(range(len(seqs)))  # every process runs as many passes (equal shares)
    if passes:
        again = forward([examples[i] for i in passes], [list(tokens[i]) for i in passes])
        at = {j: n for n, j in enumerate(passes)}  # only the pairs to redo take its values
        pe[redo], me[redo] = again.pe[[at[i] for i in redo]], again.me[[at[i] for i in redo]]
    return pe, me, n_tok


def score_generated(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    out: Any,
    options: ScoringOptions | None = None,
    *,
    progress: bool = True,
    desc: str = "scoring own answers",
    **fields: Any,
) -> Scores:
    """PE/ME of the generated answers `out` (a `starlora.generation.Generated` of
    [len(examples)] rows: repeat an example once per sample) as `score_examples` defines them,
    with MC passes as `options`/`fields` ask (`ScoringOptions`). Pass 1 is the generation's
    own measurement (see the module docstring: deterministic, the model's dtype), passes 2..K
    are forward passes with MC dropout (`score_examples` with ``mc_salts=1..K-1``: the masks
    of those passes). Returns `Scores` aligned with `examples`, per-pass values [N, K] when K > 1.
    """
    opts = ScoringOptions.build(options, **fields)
    K = opts.mc_passes
    single = dict(progress=progress, desc=desc, **{**vars(opts), "mc_passes": 1})

    def forward(chunk: list[Example], answers: list[list[int]]) -> Scores:
        return score_examples(model, tokenizer, task, chunk, answer_ids=answers, **single)

    measured = None if out.nll is None else (np.array([np.sum(x) for x in out.nll]),
                                             np.array([np.sum(x) for x in out.entropy]))
    pe0, me0, n_tok = _first_pass(model, tokenizer, task, examples, out.tokens, measured,
                                  opts.max_length, forward, out.prompt_room)
    pe, me = pe0[:, None], me0[:, None]
    if K > 1:
        rest = score_examples(model, tokenizer, task, examples, opts, answer_ids=out.tokens,
                              mc_salts=range(1, K), progress=progress, desc=desc)
        pe = np.concatenate([pe, rest.pe_passes], axis=1)
        me = np.concatenate([me, rest.me_passes], axis=1)
    if "pe" not in opts.measures:
        pe = np.full_like(pe, np.nan)
    if "me" not in opts.measures:
        me = np.full_like(me, np.nan)
    denom = np.maximum(n_tok, 1)
    return Scores(ids=[ex.id for ex in examples], pe=pe.mean(axis=1),
                  pe_per_token=pe.mean(axis=1) / denom, me=me.mean(axis=1),
                  me_per_token=me.mean(axis=1) / denom, n_answer_tokens=n_tok,
                  pe_passes=pe if K > 1 else None, me_passes=me if K > 1 else None)


def score_own_answers(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    *,
    max_new_tokens: int,
    samples: int = 1,
    generation_batch_size: int = GENERATION_BATCH,
    seed: int = 0,
    max_length: int | None = None,
    progress: bool = True,
    while_generating: bool = True,
    groups: Sequence[int] | None = None,
    **kwargs: Any,
) -> tuple[Scores, Any]:
    """Label-free PE/ME: `model` answers each example itself (`own_answers`: greedy, or
    `samples` N > 1 at temperature 1 seeded from `seed`), and `score_generated` measures those
    tokens (the first pass while generating, MC passes 2..K as `kwargs` ask); `groups` as
    `own_answers` takes them. Returns
    (scores [N] with each measure the mean over the samples and per-pass values likewise,
    `starlora.generation.Generated` [N * S]). The examples' own answers are never read.

    ``while_generating=False``: every pass by `score_examples` (all K with MC dropout), as
    before scoring while generating existed. Its numbers do not depend on which examples share
    a batch, down to the last bit (the teacher-forced scorer's rows are independent), whereas a
    greedy batch's logits carry its padding in their last bits: callers whose files must be
    byte-identical whatever the number of processes use it (`starlora.run.uncertainty`)."""
    out = own_answers(model, tokenizer, task, examples, max_new_tokens=max_new_tokens,
                      samples=samples, generation_batch_size=generation_batch_size, seed=seed,
                      max_length=max_length, progress=progress, measure=while_generating,
                      desc=kwargs.pop("generation_desc", "generating answers"), groups=groups)
    repeated = [ex for ex in examples for _ in range(samples)]
    score = score_generated if while_generating else score_examples
    given = dict(answer_ids=out.tokens) if not while_generating else dict(out=out)
    scores = score(model, tokenizer, task, repeated, seed=seed, max_length=max_length,
                   progress=progress, **given, **kwargs)
    return scores.mean_over(samples), out


class BaseAnswers(NamedTuple):
    """The base model's own answers, [N * S] rows grouped by prompt: `tokens` the generated ids,
    `pe` and `me` [N * S] float64 the first pass its generation measured (nats, sums),
    `prompt_room` the longest prompt the generation saw (`Generated.prompt_room`)."""

    tokens: list[list[int]]
    pe: np.ndarray
    me: np.ndarray
    prompt_room: int | None = None


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
) -> BaseAnswers:
    """The frozen base model's own answers to `prompts` ([N] token-id lists), with the PE/ME
    their generation measured (`BaseAnswers`, [N * samples] rows grouped by prompt). Cached on
    disk like base scores, keyed by the prompt's tokens in a file keyed by the weights, dtype
    and generation settings (the stop tokens among them); sampled answers are seeded by the prompt's key, so they do not
    depend on the run or the batch. Greedy answers in less than fp32 are generated in fixed
    shapes (`starlora.generation`), whose bucket and row count the key holds too."""
    from starlora.generation import generate, uses_fixed_shapes

    keys = [sequence_key(p, []) for p in prompts]

    def make(positions: list[int]) -> list[dict[str, Any]]:
        with adapter_disabled(model):
            out = generate(model, tokenizer, [prompts[i] for i in positions],
                           max_new_tokens=max_new_tokens, batch_size=batch_size,
                           samples=samples, temperature=temperature,
                           seeds=[int(keys[i][:8], 16) for i in positions],
                           progress=progress, desc="generating pool answers (base, cached)",
                           measure=True)
        assert out.nll is not None and out.entropy is not None
        return [{"answers": [out.tokens[j] for j in out.of(n)],
                 "pe": [float(np.sum(out.nll[j])) for j in out.of(n)],
                 "me": [float(np.sum(out.entropy[j])) for j in out.of(n)]}
                for n in range(len(positions))]

    if not fingerprint:  # weights without a fingerprint: generated every time
        records = make(list(range(len(prompts))))
    else:
        generation = {"max_new_tokens": max_new_tokens, "samples": samples,
                      "temperature": temperature, "stop": stop_tokens(model, tokenizer)}
        if uses_fixed_shapes(dtype, temperature > 0):  # a row's bits depend on these
            generation["fixed_shapes"] = {"bucket": BUCKET, "rows": batch_size}
        key = {**base_cache_key(fingerprint, measures=("pe", "me"), dtype=dtype),
               "generation": generation}
        records = BaseScoreCache(default_score_cache_dir(), key).records(keys, make)
    return BaseAnswers([a for r in records for a in r["answers"]],
                       np.array([x for r in records for x in r["pe"]], np.float64),
                       np.array([x for r in records for x in r["me"]], np.float64),
                       prompt_room(model, max_new_tokens))


def score_base_answers(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    answers: BaseAnswers,
    **kwargs: Any,
) -> Scores:
    """PE/ME of the base model's own `answers` ([len(examples)] rows: repeat an example once per
    sample): the first pass its generation measured, or `score_base` (`kwargs`: its cache,
    measures, max_length...) for a pair cut to `max_length`. Deterministic (one pass)."""
    def forward(chunk: list[Example], given: list[list[int]]) -> Scores:
        return score_base(model, tokenizer, task, chunk, answer_ids=given, **kwargs)

    measures = tuple(kwargs.get("measures", ("pe", "me")))
    pe, me, n_tok = _first_pass(model, tokenizer, task, examples, answers.tokens,
                                (answers.pe, answers.me), kwargs.get("max_length"), forward,
                                answers.prompt_room)
    pe = pe if "pe" in measures else np.full_like(pe, np.nan)
    me = me if "me" in measures else np.full_like(me, np.nan)
    denom = np.maximum(n_tok, 1)
    return Scores(ids=[ex.id for ex in examples], pe=pe, pe_per_token=pe / denom, me=me,
                  me_per_token=me / denom, n_answer_tokens=n_tok)
