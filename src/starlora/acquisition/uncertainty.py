"""Plain uncertainty: `pe` and `me`, the adapted model's predictive or maximum entropy of its
answer (the paper's baselines)."""

from __future__ import annotations

import numpy as np

from starlora.acquisition.base import QueryStrategy, ScoreTable
from starlora.acquisition.registry import StrategyOptions, register_strategy


class Uncertainty(QueryStrategy):
    """u = u_full: the adapted model's own uncertainty, the score column `measure` (PE or ME,
    the paper's baselines; also the self-consistency measures, `starlora.acquisition.
    consistency`)."""

    def __init__(self, measure: str):
        self.measure, self.name, self.needs = measure, measure, (measure,)

    def utility(
        self, scores: ScoreTable, *, n: int, query_index: int, rng: np.random.Generator
    ) -> np.ndarray:
        return np.asarray(scores[self.measure], float)


@register_strategy("pe", "me")
def _uncertainty(name: str, options: StrategyOptions) -> QueryStrategy:
    return Uncertainty(name)
