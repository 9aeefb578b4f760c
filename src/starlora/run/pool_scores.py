"""The score phase's table: one row per candidate with the columns its strategy needs.

    {"id", "pe", "pe_passes", "pe_base", "answer"}      (the ME columns likewise)

``scoring.answers: generated`` (the default) measures the model's *own* answer, so a pool
needs no answers: the adapted model generates one answer per item (greedy; with
``scoring.samples`` N > 1, N answers at temperature 1, seeded from the round's "score"
stream), and PE/ME are computed on those tokens with MC dropout. With samples, PE is the mean
sequence NLL over them, the Monte-Carlo estimate of the predictive entropy (ME likewise the
mean). ``answer`` is the most likely generated answer, the draft people see.
``scoring.answers: gold`` scores the pool's gold answers, as the authors' code does.

The base term (``pe_base``, ``me_base``), with ``scoring.answers: generated``:

* ``scoring.base_scores: adapted`` (the default): the base model (adapter disabled) scores the
  *adapted* model's answers, the very tokens the full term measures: no base generation, one
  more forward pass per answer, every round (not cached: see `_base_columns`).
* ``own`` (the first study's): the base model scores its *own* greedy answers (N samples at
  temperature 1 with samples), generated and scored once and cached by content
  (`starlora.scoring.cache`). The two terms then measure different sequences.

With gold answers both terms already score the gold answer.

``scoring.per_token: true`` writes PE/ME (both terms) as means over the answer's tokens
instead of sums (no per-pass values then).

Columns that need no PE/ME pass:

    "answer_tokens"   the length of the adapted model's own answer in generated tokens (stop
                      token included; the mean over ``scoring.samples``), for ``length``;
                      always the own answer, also with ``scoring.answers: gold``.
    "answer_entropy"  self-consistency of the adapted model's ``scoring.samples`` K >= 2
                      sampled answers (`starlora.scoring.consistency`), each final answer
                      read by the task's `extract` (None, no answer, is a class of its own):
                      the entropy of their empirical distribution (nats, 0 .. log K)
    "disagreement"    the share of the K samples whose final answer differs from the greedy
                      answer's (one more greedy generation)
    "answer_entropy_base", "disagreement_base"
                      the same for the frozen base model's own samples and greedy answer
                      (generated once, cached by content like base scores)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlora.acquisition.base import ARRAY_COLUMNS
from starlora.errors import ConfigError
from starlora.run.context import Run
from starlora.scoring.results import MEASURES
from starlora.tasks import Example

if TYPE_CHECKING:
    from starlora.acquisition import QueryStrategy
    from starlora.config import ExperimentConfig

#: the own answer's length in tokens (the `length` control)
LENGTH = "answer_tokens"
#: self-consistency measures of sampled answers (each may have a ``_base`` term)
CONSISTENCY = ("answer_entropy", "disagreement")


def columns() -> list[str]:
    """Every column a strategy may name in its ``needs`` (see the module docstring), and the
    embedding columns (`starlora.run.embeddings`)."""
    terms = [*MEASURES, *CONSISTENCY]
    return [*terms, *(f"{c}_base" for c in terms), LENGTH, *ARRAY_COLUMNS]


def check_scoring(config: ExperimentConfig, strategy: QueryStrategy) -> None:
    """Refuse, before any work, a strategy that needs a column no phase computes (a strategy
    of your own), and scoring settings the strategy cannot use: self-consistency needs
    ``scoring.samples`` >= 2."""
    if unknown := [c for c in strategy.needs if c not in columns()]:
        raise ConfigError(f"active_learning.strategy: {strategy} needs {', '.join(unknown)}, "
                          f"which no phase computes; known columns: {', '.join(columns())}")
    wanted = [c for c in strategy.needs if c.removesuffix("_base") in CONSISTENCY]
    if wanted and config.scoring.samples < 2:
        raise ConfigError(f"scoring.samples: {strategy} reads {', '.join(wanted)}, the "
                          "agreement of sampled answers, which needs scoring.samples >= 2 "
                          f"(got {config.scoring.samples}); 5-10 is usual")


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
    agree = tuple(m for m in CONSISTENCY if m in needs)
    agree_base = tuple(m for m in CONSISTENCY if f"{m}_base" in needs)
    sc = run.config.scoring
    generated = sc.answers == "generated"
    on_adapted = bool(base) and generated and sc.base_scores == "adapted"
    own = (full and generated) or on_adapted or LENGTH in needs or bool(agree)

    def share_rows(share: list[Example], groups: list[int] | None = None) -> list[dict]:
        rows: list[dict[str, Any]] = [{"id": ex.id} for ex in share]
        out = _own_answers(run, model, share, seed, groups=groups) if own else None
        if full:
            _adapter_columns(run, model, share, full, seed, rows, out)
        if out is not None:  # the draft people see
            for i, row in enumerate(rows):
                row["answer"] = out.best_text(i)
        if base:
            _base_columns(run, model, share, base, rows, out if on_adapted else None)
        if LENGTH in needs:
            for i, row in enumerate(rows):
                row[LENGTH] = _count(sum(len(out.tokens[j]) for j in out.of(i)) / out.samples)
        if agree:
            greedy = out if sc.samples == 1 else _own_answers(run, model, share, seed, 1)
            _consistency_columns(run, out.texts, greedy.texts, agree, "", rows)
        if agree_base:
            _consistency_columns(run, *_base_texts(run, model, share), agree_base, "_base", rows)
        return rows

    if not (full or base or own or agree_base):  # nothing to compute: the ids alone
        return share_rows(candidates) if dist.is_main() else None

    def lengths() -> list[int]:  # what each candidate costs: prompt (+ gold answer) tokens
        if generated or not full and not base:
            return [len(run.prompt_ids(ex)) for ex in candidates]
        return [sum(map(len, run.task.encode(run.tokenizer, ex))) for ex in candidates]

    from starlora.generation import sampled_group_size

    # sampled answers `per_group` prompts a batch, the same batches with any process count
    per_group = sampled_group_size(sc.samples, run.config.evaluation.batch_size) if own else 1
    return dist.map_groups(share_rows, candidates, lengths, per_group)


def _consistency_columns(run: Run, sampled: list[str], greedy: list[str],
                         measures: tuple[str, ...], suffix: str, rows: list[dict]) -> None:
    """`measures` of each row's K = len(sampled) / len(rows) sampled answers (grouped by row)
    against its greedy answer, final answers read by the task's `extract`."""
    from starlora.scoring.consistency import answer_entropy, disagreement

    k = len(sampled) // len(rows)
    for i, row in enumerate(rows):
        answers = [run.task.extract(t) for t in sampled[i * k:(i + 1) * k]]
        if "answer_entropy" in measures:
            row["answer_entropy" + suffix] = answer_entropy(answers)
        if "disagreement" in measures:
            row["disagreement" + suffix] = disagreement(answers, run.task.extract(greedy[i]))


def _base_texts(run: Run, model: Any, candidates: list[Example]) -> tuple[list[str], list[str]]:
    """The frozen base model's ``scoring.samples`` sampled answers [N * K] and greedy answers
    [N] to `candidates`, decoded (generated once per prompt, cached by content)."""
    from starlora.scoring import base_answers

    prompts = [run.prompt_ids(ex) for ex in candidates]
    texts = []
    for k in (run.config.scoring.samples, 1):
        tokens = base_answers(model, run.tokenizer, prompts, fingerprint=run.fingerprint,
                              dtype=next(run.base_model.parameters()).dtype,
                              max_new_tokens=run.max_new_tokens, samples=k,
                              temperature=1.0 if k > 1 else 0.0,
                              batch_size=run.config.evaluation.batch_size,
                              progress=run.progress).tokens
        texts.append([run.tokenizer.decode(t, skip_special_tokens=True) for t in tokens])
    return texts[0], texts[1]


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


def _own_answers(run: Run, model: Any, candidates: list[Example], seed: int,
                 samples: int | None = None, groups: list[int] | None = None) -> Any:
    """The adapted model's own answers (`starlora.scoring.own_answers`): greedy, or
    `samples` (default ``scoring.samples``) at temperature 1 seeded from the round's "score"
    stream `seed`, a batch per group of `groups` (`starlora.distributed.map_groups`) or per
    candidate."""
    from starlora.scoring import own_answers

    samples = run.config.scoring.samples if samples is None else samples
    return own_answers(model, run.tokenizer, run.task, candidates,
                       max_new_tokens=run.max_new_tokens, samples=samples,
                       groups=groups if samples > 1 else None,
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
        _put(run, rows, scores, measures, "", per_pass=True)
        return
    repeated = [ex for ex in candidates for _ in range(out.samples)]
    # the first pass was measured while generating: forward passes only for passes 2..K
    scores = score_generated(model, run.tokenizer, run.task, repeated, out,
                             desc="scoring pool (adapter, own answers)", **options)
    _put(run, rows, scores.mean_over(out.samples), measures, "", per_pass=True)


def _base_columns(run: Run, model: Any, candidates: list[Example], measures: tuple[str, ...],
                  rows: list[dict], adapted: Any = None) -> None:
    """The base term: the frozen base model's PE/ME of its own answers, of the gold answers,
    or (`adapted`, the adapted model's `Generated` answers) of those very tokens."""
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
    if adapted is not None:  # the adapted model's tokens, adapter disabled: one forward pass
        n = adapted.samples
        # not cached: below fp32 a sequence's score depends on its batch-mates (their shapes),
        # so scores shared by content would make a run's base term depend on which run scored
        # an answer first, or last when two run at once (and a resume read the other's); the
        # adapted model's answers change every round anyway
        kwargs.update(cache=None, desc="scoring pool (base model on the adapter's answers)")
        scores = score_base(model, run.tokenizer, run.task,
                            [ex for ex in candidates for _ in range(n)],
                            answer_ids=adapted.tokens, **kwargs)
        _put(run, rows, scores.mean_over(n), measures, "_base", per_pass=False)
        return
    if run.config.scoring.answers != "generated":
        _put(run, rows, score_base(model, run.tokenizer, run.task, candidates, **kwargs),
             measures, "_base", per_pass=False)
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
    _put(run, rows, scores.mean_over(n), measures, "_base", per_pass=False)


def _put(run: Run, rows: list[dict], scores: Any, measures: tuple[str, ...], suffix: str, *,
         per_pass: bool) -> None:
    """Write `measures` of `scores` (aligned with `rows`) into `rows`: sums over the answer's
    tokens, or their means with ``scoring.per_token``; with `per_pass`, and sums, the
    per-pass values too."""
    per_token = run.config.scoring.per_token
    for m in measures:
        values = getattr(scores, f"{m}_per_token" if per_token else m)
        passes = None if per_token else getattr(scores, f"{m}_passes")
        for i, row in enumerate(rows):
            row[m + suffix] = float(values[i])
            if per_pass and passes is not None:
                row[f"{m}_passes"] = [float(x) for x in passes[i]]
