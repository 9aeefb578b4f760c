"""Self-consistency strategies: how much the model's sampled answers disagree, read as final
answers by the task's `extract` (columns from `starlora.run.pool_scores`; the measures in
`starlora.scoring.consistency`; ``scoring.samples`` K >= 2 answers per item):

    answer_entropy          entropy of the K extracted answers' empirical distribution
                            (exact-match semantic entropy; a missing answer is its own class)
    disagreement            share of the K samples whose answer differs from the greedy one
    answer_entropy-dynamic  STAR's mix (`Dynamic`) of the base model's measure on its own
    disagreement-dynamic    samples (``*_base``) and the adapted model's, with λ(t)

The standard label-free uncertainty for tasks with short final answers (Wang et al. 2023,
self-consistency; Kuhn et al. 2023, semantic entropy): it measures whether the model's answer
is stable, not how long or how unlikely its wording is.
"""

from __future__ import annotations

from starlora.acquisition.base import QueryStrategy
from starlora.acquisition.dynamic import Dynamic
from starlora.acquisition.registry import StrategyOptions, register_strategy
from starlora.acquisition.uncertainty import Uncertainty


@register_strategy("answer_entropy", "disagreement")
def _consistency(name: str, options: StrategyOptions) -> QueryStrategy:
    return Uncertainty(name)


@register_strategy("answer_entropy-dynamic", "disagreement-dynamic")
def _consistency_dynamic(name: str, options: StrategyOptions) -> QueryStrategy:
    return Dynamic(name.removesuffix("-dynamic"), options.schedule(), options.normalize)
