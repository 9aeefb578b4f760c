"""Control strategies, which read no uncertainty: `random` (uniform, seeded; the baseline
every strategy must beat) and `length` (the longest own answer first; the difficulty control
an uncertainty strategy must beat to claim it measures more than length)."""

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


class Length(QueryStrategy):
    """The longest own answer first: u = the adapted model's answer length in tokens (column
    ``answer_tokens``). A difficulty control: an uncertainty strategy must beat it to claim it
    measures more than how long the model talks. Ties (e.g. answers cut at the token limit)
    are broken by the query's stream."""

    name = "length"
    needs = ("answer_tokens",)

    def utility(
        self, scores: ScoreTable, *, n: int, query_index: int, rng: np.random.Generator
    ) -> np.ndarray:
        return np.asarray(scores["answer_tokens"], float)


@register_strategy("length")
def _length(name: str, options: StrategyOptions) -> QueryStrategy:
    return Length()
