"""STAR's strategies, which weigh the adapted model's uncertainty (u_full, column ``pe`` or
``me``) against the frozen base model's (u_base, ``pe_base`` or ``me_base``):

    pe-subtract   u_full - u_base (raw; the authors' u_full - minmax(u_base) with "raw_full")
    me-subtract
    pe-dynamic    STAR: u = λ(t)·norm(u_base) + (1 - λ(t))·norm(u_full)
    me-dynamic

λ(t) falls over the queries (`LambdaSchedule`): early on, an adapter trained on a few hundred
examples has unreliable uncertainty (the "uncertainty gap"), so the base model's judgement
dominates; later the adapter's takes over. `norm` is min-max over the current pool so both
terms share one scale; ``normalize="raw_full"`` reproduces the authors' released code, which
leaves u_full raw (then the larger raw term drowns the normalised base term).
"""

from __future__ import annotations

import numpy as np

from starlora.acquisition.base import LambdaSchedule, QueryStrategy, ScoreTable, minmax
from starlora.acquisition.registry import StrategyOptions, register_strategy
from starlora.errors import ConfigError


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


@register_strategy("pe-subtract", "me-subtract")
def _subtract(name: str, options: StrategyOptions) -> QueryStrategy:
    return Subtract(name.removesuffix("-subtract"), options.normalize)


@register_strategy("pe-dynamic", "me-dynamic")
def _dynamic(name: str, options: StrategyOptions) -> QueryStrategy:
    return Dynamic(name.removesuffix("-dynamic"), options.schedule(), options.normalize)
