"""The strategy contract (`QueryStrategy`: numbers in, ranked ids out), the λ schedule of the
dynamic strategies and the pool-wise min-max scaling they share.

A strategy never sees a model or a tokenizer, only a table of scores over the current pool
(the columns are listed in `starlora.acquisition`):

    scores: dict[str, np.ndarray]   # each array [N], aligned with ids [N]

except the `ARRAY_COLUMNS` of embeddings, which are [rows, d]. A strategy that chooses its
batch as a set (typicality, diversity) overrides `batch`, which gets the batch size.

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

from starlora.errors import ConfigError, EmptyPoolError, PoolExhaustedError, QuerySizeError

ScoreTable = Mapping[str, np.ndarray]
#: score-table columns that are [rows, d] arrays, not one number per candidate
ARRAY_COLUMNS = ("embedding", "labelled_embedding")


#: the λ schedules, and the defaults of ``active_learning.lambda_*`` (the authors' linear
#: 0.9 -> 0.1); `StrategyOptions` and `starlora.config` read them from here
LAMBDA_SCHEDULES = ("linear", "cosine", "exponential", "constant")
LAMBDA_SCHEDULE, LAMBDA_START, LAMBDA_END = "linear", 0.9, 0.1


@dataclass(frozen=True)
class LambdaSchedule:
    """Weight of the base model's uncertainty at query t = 0 .. n_queries-1.

    linear:      start + (end - start)·t/(n-1)            (the authors' schedule)
    cosine:      end + (start - end)·(1 + cos(π·t/(n-1)))/2
    exponential: start·(end/start)^(t/(n-1))
    constant:    start
    With a single query, λ = start.
    """

    kind: str = LAMBDA_SCHEDULE
    start: float = LAMBDA_START
    end: float = LAMBDA_END
    n_queries: int = 9

    def __post_init__(self) -> None:
        if self.kind not in LAMBDA_SCHEDULES:
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


def check_query_size(k: int) -> None:
    """Refuse (QuerySizeError) a query of `k` <= 0 examples: the one check every strategy
    goes through (`QueryStrategy.select_rows`, and `rank` with a `k`)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise QuerySizeError(f"a query takes k >= 1 examples, got k = {k!r} (active_learning."
                             "query_size, or a budget smaller than what is labelled already)")


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
        and scalars such as λ. By default the [N] columns the strategy reads."""
        return {c: np.asarray(scores[c], float) for c in self.needs if c not in ARRAY_COLUMNS}

    def batch(
        self, scores: ScoreTable, order: np.ndarray, utility: np.ndarray, k: int,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, np.ndarray | None] | None:
        """A strategy that chooses its `k` as a set (typicality, diversity) returns (the
        indices chosen, best first; their utility for the record, or None to keep
        `utility`'s). `order` [N] ranks by `utility` [N], ties broken. None (the default):
        the first `k` of `order`."""
        return None

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
            shape = np.shape(scores[key])
            if key in ARRAY_COLUMNS:
                if len(shape) != 2 or (key == "embedding" and shape[0] != n):
                    raise ValueError(f"{self}: column {key!r} has shape {shape}, expected "
                                     f"({n if key == 'embedding' else 'M'}, d)")
            elif shape != (n,):
                raise ValueError(f"{self}: column {key!r} has shape {shape}, expected ({n},)")
            if not np.all(np.isfinite(scores[key])):
                raise ValueError(f"{self}: column {key!r} holds NaN or inf")

    def _order(
        self, ids: Sequence[str], scores: ScoreTable, query_index: int, rng: np.random.Generator,
        k: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(order [N] indices, best first; utility [N] float64). With `k`, a `batch` strategy's
        choice of `k` comes first, then the rest by utility."""
        if k is not None:
            check_query_size(k)
        self._check(ids, scores)
        n = len(ids)
        u = np.asarray(self.utility(scores, n=n, query_index=query_index, rng=rng), np.float64)
        if u.shape != (n,):
            raise ValueError(f"{self}: utility has shape {u.shape}, expected ({n},)")
        order = np.lexsort((rng.random(n), -u))  # by -u, ties by a random key
        chosen = self.batch(scores, order, u, min(k, n), rng) if k is not None else None
        if chosen is not None:
            first, values = chosen
            if values is not None:
                u = u.copy()
                u[first] = values
            rest = np.ones(n, bool)
            rest[first] = False
            order = np.concatenate([first, order[rest[order]]])
        return order, u

    def rank(
        self, ids: Sequence[str], scores: ScoreTable, *, query_index: int,
        rng: np.random.Generator, k: int | None = None,
    ) -> list[str]:
        """Every id, best first; with `k`, a `batch` strategy's `k` first."""
        order, _ = self._order(ids, scores, query_index, rng, k)
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
        PoolExhaustedError, or return all that is left when `take_rest`. A `k` <= 0 is a
        QuerySizeError (``order[:k]`` would otherwise take all but the last |k|)."""
        check_query_size(k)
        if len(ids) < k and not take_rest:
            raise PoolExhaustedError(
                f"query of {k} examples but only {len(ids)} remain unlabelled "
                "(set active_learning.on_exhausted: take_rest to take what is left)"
            )
        order, u = self._order(ids, scores, query_index, rng, k)
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
