"""Acquisition: which unlabelled examples to label next. This is where the STAR method lives
(with `scoring`, which produces the numbers used here).

Every strategy follows one contract (`QueryStrategy`): numbers in, ranked ids out. A strategy
never sees a model or a tokenizer, only a table of uncertainty scores over the current pool:

    scores: dict[str, np.ndarray]   # each array [N], aligned with ids [N]
        "pe"       predictive entropy with the adapter, -log p(answer | prompt) summed (nats)
        "me"       maximum entropy with the adapter: summed full-vocabulary entropy (nats)
        "pe_base"  the same measures from the frozen base model (adapter disabled)
        "me_base"

Strategies (`make_strategy` names):

    random        uniform, seeded
    pe, me        u_full, the model-with-adapter's uncertainty
    pe-subtract   u_full - u_base (raw; the authors' u_full - minmax(u_base) with "raw_full")
    me-subtract
    pe-dynamic    STAR: u = λ(t)·norm(u_base) + (1 - λ(t))·norm(u_full)
    me-dynamic

λ(t) falls over the queries (`LambdaSchedule`): early on, an adapter trained on a few hundred
examples has unreliable uncertainty (the "uncertainty gap"), so the base model's judgement
dominates; later the adapter's takes over. `norm` is min-max over the current pool so both
terms share one scale; ``normalize="raw_full"`` reproduces the authors' released code, which
leaves u_full raw (then the larger raw term drowns the normalised base term).

Ties are broken by the seeded generator passed in, so a rank is reproducible. `select_rows`
returns, with each chosen id, its utility and the terms it was mixed from, which the loop
writes to ``selected.jsonl``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from starlora.errors import ConfigError, EmptyPoolError, PoolExhaustedError

ScoreTable = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class LambdaSchedule:
    """Weight of the base model's uncertainty at query t = 0 .. n_queries-1.

    linear:      start + (end - start)·t/(n-1)            (the authors' schedule)
    cosine:      end + (start - end)·(1 + cos(π·t/(n-1)))/2
    exponential: start·(end/start)^(t/(n-1))
    constant:    start
    With a single query, λ = start.
    """

    kind: str = "linear"
    start: float = 0.9
    end: float = 0.1
    n_queries: int = 9

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "cosine", "exponential", "constant"):
            raise ConfigError(f"active_learning.lambda_schedule: unknown schedule {self.kind!r}")
        if self.kind == "exponential" and min(self.start, self.end) <= 0:
            raise ConfigError("active_learning.lambda_schedule: exponential needs start, end > 0")

    def __call__(self, t: int) -> float:
        if self.kind == "constant" or self.n_queries <= 1:
            return self.start
        x = min(max(t, 0), self.n_queries - 1) / (self.n_queries - 1)
        if self.kind == "linear":
            return self.start + (self.end - self.start) * x
        if self.kind == "cosine":
            return self.end + (self.start - self.end) * (1 + math.cos(math.pi * x)) / 2
        return self.start * (self.end / self.start) ** x

    def __str__(self) -> str:
        return f"{self.kind}({self.start:g}->{self.end:g} over {self.n_queries} queries)"


def minmax(u: np.ndarray) -> np.ndarray:
    """Scale [N] scores to [0, 1] over the pool; a constant column becomes all zeros."""
    lo, hi = float(np.min(u)), float(np.max(u))
    return np.zeros_like(u, dtype=np.float64) if hi == lo else (u - lo) / (hi - lo)


class QueryStrategy(ABC):
    """Contract: `rank` orders every pool id from most to least worth labelling.

    `needs` names the score columns the strategy reads; the loop computes only those.
    `query_index` is t, the 0-based number of the query (the first query after the initial
    labelled set is t = 0). `rng` is the query's own random stream: it breaks ties and drives
    random choices. Every strategy computes a utility, `random` included (uniform draws, as
    baal's ``Random``): there is no silent fallback for a strategy without score columns.
    """

    name: str = "strategy"
    needs: tuple[str, ...] = ()

    @abstractmethod
    def utility(
        self, scores: ScoreTable, *, n: int, query_index: int, rng: np.random.Generator
    ) -> np.ndarray:
        """[n] float64, higher = label sooner."""

    def terms(self, scores: ScoreTable, query_index: int) -> dict[str, np.ndarray | float]:
        """What the utility was made of, for the record (``selected.jsonl``): [N] columns
        and scalars such as λ. By default the columns the strategy reads."""
        return {c: np.asarray(scores[c], float) for c in self.needs}

    def mixing_weight(self, query_index: int) -> float | None:
        """λ(t) of a strategy that mixes base and adapter uncertainty; None for the others."""
        return None

    def _check(self, ids: Sequence[str], scores: ScoreTable) -> None:
        n = len(ids)
        if n == 0:
            raise EmptyPoolError("the unlabelled pool is empty: nothing left to query")
        for key in self.needs:
            if key not in scores:
                raise KeyError(f"{self}: needs score column {key!r}")
            if np.shape(scores[key]) != (n,):
                raise ValueError(f"{self}: column {key!r} has shape {np.shape(scores[key])}, "
                                 f"expected ({n},)")
            if not np.all(np.isfinite(scores[key])):
                raise ValueError(f"{self}: column {key!r} holds NaN or inf")

    def _order(
        self, ids: Sequence[str], scores: ScoreTable, query_index: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """(order [N] indices, best first; utility [N] float64)."""
        self._check(ids, scores)
        n = len(ids)
        u = np.asarray(self.utility(scores, n=n, query_index=query_index, rng=rng), np.float64)
        if u.shape != (n,):
            raise ValueError(f"{self}: utility has shape {u.shape}, expected ({n},)")
        order = np.lexsort((rng.random(n), -u))  # by -u, ties by a random key
        return order, u

    def rank(
        self, ids: Sequence[str], scores: ScoreTable, *, query_index: int, rng: np.random.Generator
    ) -> list[str]:
        order, _ = self._order(ids, scores, query_index, rng)
        return [ids[i] for i in order]

    def select_rows(
        self,
        ids: Sequence[str],
        scores: ScoreTable,
        k: int,
        *,
        query_index: int,
        rng: np.random.Generator,
        take_rest: bool = False,
    ) -> list[dict[str, object]]:
        """The `k` ids to label next, best first, each as ``{"id", "rank", "utility", **terms}``
        (`terms`' columns at that id, its scalars as they are). If fewer than `k` remain, raise
        PoolExhaustedError, or return all that is left when `take_rest`."""
        if len(ids) < k and not take_rest:
            raise PoolExhaustedError(
                f"query of {k} examples but only {len(ids)} remain unlabelled "
                "(set active_learning.on_exhausted: take_rest to take what is left)"
            )
        order, u = self._order(ids, scores, query_index, rng)
        terms = self.terms(scores, query_index)
        rows = []
        for rank, i in enumerate(order[:k]):
            row: dict[str, object] = {"id": ids[i], "rank": rank, "utility": float(u[i])}
            for name, value in terms.items():
                row[name] = float(value[i]) if isinstance(value, np.ndarray) else value
            rows.append(row)
        return rows

    def select(
        self,
        ids: Sequence[str],
        scores: ScoreTable,
        k: int,
        *,
        query_index: int,
        rng: np.random.Generator,
        take_rest: bool = False,
    ) -> list[str]:
        """The ids of `select_rows`."""
        rows = self.select_rows(ids, scores, k, query_index=query_index, rng=rng,
                                take_rest=take_rest)
        return [str(r["id"]) for r in rows]

    def __str__(self) -> str:
        return self.name


class Random(QueryStrategy):
    """Uniform: the utility is a fresh uniform draw per example from the query's stream."""

    name = "random"

    def utility(
        self, scores: ScoreTable, *, n: int, query_index: int, rng: np.random.Generator
    ) -> np.ndarray:
        return rng.random(n)


class Uncertainty(QueryStrategy):
    """u = u_full: the adapted model's own uncertainty (baseline PE or ME)."""

    def __init__(self, measure: str):
        self.measure, self.name, self.needs = measure, measure, (measure,)

    def utility(
        self, scores: ScoreTable, *, n: int, query_index: int, rng: np.random.Generator
    ) -> np.ndarray:
        return np.asarray(scores[self.measure], float)


class Subtract(QueryStrategy):
    """u = u_full - u_base: what the adapter is unsure of beyond the base model.

    ``normalize="minmax"`` (default) subtracts the raw values, which share one scale (both are
    the same measure in nats). ``"raw_full"`` is the authors' released code: raw u_full minus
    min-max normalised u_base, a term in [0, 1] that barely moves the ranking of u_full.
    """

    def __init__(self, measure: str, normalize: str = "minmax"):
        _check_normalize(normalize)
        self.measure, self.name, self.normalize = measure, f"{measure}-subtract", normalize
        self.needs = (measure, f"{measure}_base")

    def _base(self, scores: ScoreTable) -> np.ndarray:
        base = np.asarray(scores[f"{self.measure}_base"], float)
        return minmax(base) if self.normalize == "raw_full" else base

    def utility(
        self, scores: ScoreTable, *, n: int, query_index: int, rng: np.random.Generator
    ) -> np.ndarray:
        return np.asarray(scores[self.measure], float) - self._base(scores)

    def __str__(self) -> str:
        return f"{self.name}(normalize={self.normalize})"


class Dynamic(QueryStrategy):
    """STAR's dynamic uncertainty: u = λ(t)·norm(u_base) + (1 - λ(t))·norm(u_full)."""

    def __init__(self, measure: str, schedule: LambdaSchedule, normalize: str = "minmax"):
        _check_normalize(normalize)
        self.measure, self.schedule, self.normalize = measure, schedule, normalize
        self.name = f"{measure}-dynamic"
        self.needs = (measure, f"{measure}_base")

    def mixing_weight(self, query_index: int) -> float:
        return self.schedule(query_index)

    def _mixed(self, scores: ScoreTable) -> tuple[np.ndarray, np.ndarray]:
        """(u_base, u_full) as they enter the mix, [N] each."""
        base = minmax(np.asarray(scores[f"{self.measure}_base"], float))
        full = np.asarray(scores[self.measure], float)
        return base, minmax(full) if self.normalize == "minmax" else full

    def utility(
        self, scores: ScoreTable, *, n: int, query_index: int, rng: np.random.Generator
    ) -> np.ndarray:
        lam = self.schedule(query_index)
        base, full = self._mixed(scores)
        return lam * base + (1 - lam) * full

    def terms(self, scores: ScoreTable, query_index: int) -> dict[str, np.ndarray | float]:
        base, full = self._mixed(scores)
        return {**super().terms(scores, query_index), "u_base": base, "u_full": full,
                "lambda": self.schedule(query_index)}

    def __str__(self) -> str:
        return f"{self.name}(lambda={self.schedule}, normalize={self.normalize})"


def _check_normalize(normalize: str) -> None:
    if normalize not in ("minmax", "raw_full"):
        raise ConfigError(f"active_learning.normalize: unknown value {normalize!r}")


STRATEGIES = ("random", "pe", "me", "pe-subtract", "me-subtract", "pe-dynamic", "me-dynamic")


def make_strategy(
    name: str,
    *,
    n_queries: int = 9,
    lambda_schedule: str = "linear",
    lambda_start: float = 0.9,
    lambda_end: float = 0.1,
    normalize: str = "minmax",
) -> QueryStrategy:
    """Build a strategy by name (see `STRATEGIES`); `n_queries` sizes the λ schedule."""
    if name == "random":
        return Random()
    measure, _, kind = name.partition("-")
    if measure not in ("pe", "me") or kind not in ("", "subtract", "dynamic"):
        raise ConfigError(
            f"active_learning.strategy: unknown strategy {name!r}; known: {', '.join(STRATEGIES)}"
        )
    if kind == "":
        return Uncertainty(measure)
    if kind == "subtract":
        return Subtract(measure, normalize)
    schedule = LambdaSchedule(lambda_schedule, lambda_start, lambda_end, n_queries)
    return Dynamic(measure, schedule, normalize)
