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
    pe-subtract   u_full - u_base
    me-subtract
    pe-dynamic    STAR: u = λ(t)·norm(u_base) + (1 - λ(t))·norm(u_full)
    me-dynamic

λ(t) falls over the queries (`LambdaSchedule`): early on, an adapter trained on a few hundred
examples has unreliable uncertainty (the "uncertainty gap"), so the base model's judgement
dominates; later the adapter's takes over. `norm` is min-max over the current pool so both
terms share one scale; ``normalize="raw_full"`` reproduces the authors' released code, which
leaves u_full raw (then the larger raw term drowns the normalised base term).

Ties are broken by the seeded generator passed in, so a rank is reproducible.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from starlora.errors import ConfigError, EmptyPoolError, PoolExhaustedError

Scores = Mapping[str, np.ndarray]


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
    labelled set is t = 0). `rng` breaks ties and drives random choices.
    """

    name: str = "strategy"
    needs: tuple[str, ...] = ()

    @abstractmethod
    def utility(self, scores: Scores, query_index: int) -> np.ndarray:
        """[N] float64, higher = label sooner."""

    def rank(
        self, ids: Sequence[str], scores: Scores, *, query_index: int, rng: np.random.Generator
    ) -> list[str]:
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
        u = np.asarray(self.utility(scores, query_index) if self.needs else np.zeros(n), float)
        order = np.lexsort((rng.random(n), -u))  # by -u, ties by a random key
        return [ids[i] for i in order]

    def select(
        self,
        ids: Sequence[str],
        scores: Scores,
        k: int,
        *,
        query_index: int,
        rng: np.random.Generator,
        take_rest: bool = False,
    ) -> list[str]:
        """The `k` ids to label next. If fewer than `k` remain, raise PoolExhaustedError, or
        return all that is left when `take_rest`."""
        if len(ids) < k and not take_rest:
            raise PoolExhaustedError(
                f"query of {k} examples but only {len(ids)} remain unlabelled "
                "(set active_learning.on_exhausted: take_rest to take what is left)"
            )
        return self.rank(ids, scores, query_index=query_index, rng=rng)[:k]

    def __str__(self) -> str:
        return self.name


class Random(QueryStrategy):
    name = "random"

    def utility(self, scores: Scores, query_index: int) -> np.ndarray:  # pragma: no cover
        raise AssertionError("random ranks by its tie-breaking key alone")


class Uncertainty(QueryStrategy):
    """u = u_full: the adapted model's own uncertainty (baseline PE or ME)."""

    def __init__(self, measure: str):
        self.measure, self.name, self.needs = measure, measure, (measure,)

    def utility(self, scores: Scores, query_index: int) -> np.ndarray:
        return np.asarray(scores[self.measure], float)


class Subtract(QueryStrategy):
    """u = u_full - u_base: what the adapter is unsure of beyond the base model."""

    def __init__(self, measure: str):
        self.measure, self.name = measure, f"{measure}-subtract"
        self.needs = (measure, f"{measure}_base")

    def utility(self, scores: Scores, query_index: int) -> np.ndarray:
        return np.asarray(scores[self.measure], float) - np.asarray(scores[f"{self.measure}_base"], float)


class Dynamic(QueryStrategy):
    """STAR's dynamic uncertainty: u = λ(t)·norm(u_base) + (1 - λ(t))·norm(u_full)."""

    def __init__(self, measure: str, schedule: LambdaSchedule, normalize: str = "minmax"):
        if normalize not in ("minmax", "raw_full"):
            raise ConfigError(f"active_learning.normalize: unknown value {normalize!r}")
        self.measure, self.schedule, self.normalize = measure, schedule, normalize
        self.name = f"{measure}-dynamic"
        self.needs = (measure, f"{measure}_base")

    def utility(self, scores: Scores, query_index: int) -> np.ndarray:
        lam = self.schedule(query_index)
        base = minmax(np.asarray(scores[f"{self.measure}_base"], float))
        full = np.asarray(scores[self.measure], float)
        if self.normalize == "minmax":
            full = minmax(full)
        return lam * base + (1 - lam) * full

    def __str__(self) -> str:
        return f"{self.name}(lambda={self.schedule}, normalize={self.normalize})"


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
        return Subtract(measure)
    schedule = LambdaSchedule(lambda_schedule, lambda_start, lambda_end, n_queries)
    return Dynamic(measure, schedule, normalize)
