"""The score phase's table: one row per candidate with the columns its strategy needs.

    {"id", "pe", "pe_passes", "pe_base", "answer"}      (the ME columns likewise)

``scoring.answers: generated`` (the default) measures the model's *own* answer, so a pool
needs no answers: the adapted model generates one answer per item (greedy; with
``scoring.samples`` N > 1, N answers at temperature 1), and PE/ME are computed on those
tokens with MC dropout. With samples, PE is the mean sequence NLL over them, the Monte-Carlo
estimate of the predictive entropy (ME likewise the mean). ``answer`` is the most likely
generated answer, the draft people see. The base model does the same with its own answers;
its generations and scores are cached by content (`starlora.scoring.cache`).
``scoring.answers: gold`` scores the pool's gold answers, as the authors' code does.

    "answer_tokens"   the length of the adapted model's own answer in generated tokens (stop
                      token included; the mean over ``scoring.samples``), for ``length``;
                      always the own answer, also with ``scoring.answers: gold``.
"""

from __future__ import annotations

from typing import Any

from starlora.run.context import Run
from starlora.scoring.results import MEASURES
from starlora.tasks import Example

#: the own answer's length in tokens (the `length` control)
LENGTH = "answer_tokens"


def score_rows(run: Run, candidates: list[Example], *, seed: int, model: Any) -> list[dict] | None:
    """Rows for `candidates` (see the module docstring); `model` is the adapted model (None
    when the strategy needs no scores), `seed` the round's "score" stream seed.

    Under several processes (`starlora.distributed`) each process generates and scores a
    length-balanced share of the candidates (the base cache takes every process's appends
    under its file lock); the rows come back in the order of `candidates` on the main
    process, and the others get None."""
    from starlora import distributed as dist

    needs = set(run.strategy.needs)
    full = tuple(m for m in MEASURES if m in needs)
    base = tuple(m for m in MEASURES if f"{m}_base" in needs)

    generated = run.config.scoring.answers == "generated"
    own = (full and generated) or LENGTH in needs

    def share_rows(share: list[Example]) -> list[dict]:
        rows: list[dict[str, Any]] = [{"id": ex.id} for ex in share]
        out = _own_answers(run, model, share, seed) if own else None
        if full:
            _adapter_columns(run, model, share, full, seed, rows, out)
        if out is not None:  # the draft people see
            for i, row in enumerate(rows):
                row["answer"] = out.best_text(i)
        if base:
            _base_columns(run, model, share, base, rows)
        if LENGTH in needs:
            for i, row in enumerate(rows):
                row[LENGTH] = _count(sum(len(out.tokens[j]) for j in out.of(i)) / out.samples)
        return rows

    if not (full or base or own):  # nothing to compute: the ids alone
        return share_rows(candidates) if dist.is_main() else None

    def lengths() -> list[int]:  # what each candidate costs: prompt (+ gold answer) tokens
        if generated or not full and not base:
            return [len(run.prompt_ids(ex)) for ex in candidates]
        return [sum(map(len, run.task.encode(run.tokenizer, ex))) for ex in candidates]

    return dist.map_shards(share_rows, candidates, lengths)


def _kwargs(run: Run) -> dict[str, Any]:
    sc = run.config.scoring
    return dict(batch_size=sc.batch_size, max_tokens_per_batch=sc.max_tokens_per_batch,
                max_length=run.config.training.max_length, dtype=_dtype(run),
                progress=run.progress)


def _dtype(run: Run) -> Any:
    """The dtype the pool is scored in (``scoring.dtype`` resolved for the model's weights)."""
    from starlora.scoring.options import resolve_dtype

    weights = next(run.base_model.parameters())
    return resolve_dtype(run.config.scoring.dtype, weights.device, weights.dtype)


def _count(x: float) -> int | float:
    """A token count for JSON: an int, or a float when it is a mean over samples."""
    return int(x) if float(x).is_integer() else float(x)


def _own_answers(run: Run, model: Any, candidates: list[Example], seed: int) -> Any:
    """The adapted model's own answers (`starlora.scoring.own_answers`): greedy, or
    ``scoring.samples`` at temperature 1 seeded from the round's "score" stream `seed`."""
    from starlora.scoring import own_answers

    return own_answers(model, run.tokenizer, run.task, candidates,
                       max_new_tokens=run.max_new_tokens, samples=run.config.scoring.samples,
                       generation_batch_size=run.config.evaluation.batch_size, seed=seed,
                       max_length=run.config.training.max_length, progress=run.progress,
                       desc="generating pool answers (adapter)")


def _adapter_columns(run: Run, model: Any, candidates: list[Example], measures: tuple[str, ...],
                     seed: int, rows: list[dict], out: Any) -> None:
    from starlora.scoring import score_examples, score_generated

    sc = run.config.scoring
    # the baselines may take one pass; a strategy that mixes in a base term keeps mc_passes
    single = sc.single_pass_baselines and run.strategy.mixing_weight(0) is None
    options = dict(measures=measures, mc_passes=1 if single else sc.mc_passes,
                   model_dropout=sc.model_dropout, seed=seed, **_kwargs(run))
    if sc.answers == "gold":
        scores = score_examples(model, run.tokenizer, run.task, candidates,
                                desc="scoring pool (adapter, gold answers)", **options)
        _put(rows, scores, measures, "", per_pass=True)
        return
    repeated = [ex for ex in candidates for _ in range(out.samples)]
    # the first pass was measured while generating: forward passes only for passes 2..K
    scores = score_generated(model, run.tokenizer, run.task, repeated, out,
                             desc="scoring pool (adapter, own answers)", **options)
    _put(rows, scores.mean_over(out.samples), measures, "", per_pass=True)


def _base_columns(run: Run, model: Any, candidates: list[Example], measures: tuple[str, ...],
                  rows: list[dict]) -> None:
    from starlora.scoring import (
        BaseScoreCache,
        base_answers,
        base_cache_key,
        default_score_cache_dir,
        score_base,
        score_base_answers,
    )

    dtype = _dtype(run)
    cache = None  # a model without a fingerprint of its weights must not share cached scores
    if run.fingerprint:
        cache = BaseScoreCache(default_score_cache_dir(), base_cache_key(
            run.fingerprint, measures=measures, dtype=dtype,
            max_length=run.config.training.max_length))
    kwargs = dict(measures=measures, cache=cache, desc="scoring pool (base model, cached)",
                  **_kwargs(run))
    if run.config.scoring.answers != "generated":
        _put(rows, score_base(model, run.tokenizer, run.task, candidates, **kwargs), measures,
             "_base", per_pass=False)
        return
    n = run.config.scoring.samples
    prompts = [run.prompt_ids(ex) for ex in candidates]
    answers = base_answers(model, run.tokenizer, prompts, fingerprint=run.fingerprint,
                           dtype=next(run.base_model.parameters()).dtype,
                           max_new_tokens=run.max_new_tokens, samples=n,
                           temperature=1.0 if n > 1 else 0.0,
                           batch_size=run.config.evaluation.batch_size, progress=run.progress)
    # their generation measured them (cached with the answers): no forward pass, except for
    # a pair cut to max_length
    scores = score_base_answers(model, run.tokenizer, run.task,
                                [ex for ex in candidates for _ in range(n)], answers, **kwargs)
    _put(rows, scores.mean_over(n), measures, "_base", per_pass=False)


def _put(rows: list[dict], scores: Any, measures: tuple[str, ...], suffix: str, *,
         per_pass: bool) -> None:
    """Write `measures` of `scores` (aligned with `rows`) into `rows`, with `per_pass` the
    per-pass values too."""
    for m in measures:
        values, passes = getattr(scores, m), getattr(scores, f"{m}_passes")
        for i, row in enumerate(rows):
            row[m + suffix] = float(values[i])
            if per_pass and passes is not None:
                row[f"{m}_passes"] = [float(x) for x in passes[i]]
