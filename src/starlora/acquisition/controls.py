"""Control strategies, which read no uncertainty: `random` (uniform, seeded; the baseline
every strategy must beat)."""

from __future__ import annotations

import numpy as np

from starlora.acquisition.base import QueryStrategy, ScoreTable
from starlora.acquisition.registry import StrategyOptions, register_strategy


class Random(QueryStrategy):
    """Uniform: the utility is a fresh uniform draw per example from the query's stream."""

    name = "random"

    def utility(
        self, scores: ScoreTable, *, n: int, query_index: int, rng: np.random.Generator
    ) -> np.ndarray:
        return rng.random(n)


@register_strategy("random")
def _random(name: str, options: StrategyOptions) -> QueryStrategy:
    return Random()
