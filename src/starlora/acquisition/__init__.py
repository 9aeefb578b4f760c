"""Acquisition: which unlabelled examples to label next. This is where the STAR method lives
(with `scoring`, which produces the numbers used here).

Every strategy follows one contract (`QueryStrategy`, in `base`): numbers in, ranked ids out.
A strategy never sees a model or a tokenizer, only a table of scores over the current pool:

    scores: dict[str, np.ndarray]   # each array [N], aligned with ids [N]
        "pe"       predictive entropy with the adapter, -log p(answer | prompt) summed (nats)
        "me"       maximum entropy with the adapter: summed full-vocabulary entropy (nats)
        "pe_base"  the same measures from the frozen base model (adapter disabled)
        "me_base"
        "answer_tokens"  the adapted model's own answer's length in generated tokens
        "answer_entropy" entropy of the final answers of K sampled answers (nats)
        "disagreement"   share of K sampled answers whose final answer is not the greedy one's
        "answer_entropy_base", "disagreement_base"   the same for the frozen base model

(``scoring.base_scores``: the base model scores its own answer or the adapted model's;
``scoring.per_token``: PE/ME as means over the answer's tokens; see `starlora.run.pool_scores`)

and for strategies on embeddings (`base.ARRAY_COLUMNS`; `starlora.run.embeddings` fills
them from the frozen base model's mean-pooled prompt states, d its hidden size):

        "embedding"           [N, d] float, row i the prompt of ids[i]
        "labelled_embedding"  [M, d] float, the M examples labelled so far (M may be 0)

Strategies (`make_strategy` names), one module per family:

    controls      random        uniform, seeded
                  length        the longest own answer first (difficulty control)
    uncertainty   pe, me        u_full, the model-with-adapter's uncertainty
    dynamic       pe-subtract   u_full - u_base
                  me-subtract
                  pe-dynamic    STAR: u = λ(t)·norm(u_base) + (1 - λ(t))·norm(u_full)
                  me-dynamic
    consistency   answer_entropy          self-consistency of K sampled answers
                  disagreement            (``scoring.samples`` K >= 2)
                  answer_entropy-dynamic  STAR's mix of the base model's and the adapter's
                  disagreement-dynamic
    diversity     typiclust     the most typical prompt of each large cluster no label
                                covers (Hacohen et al. 2022)
                  diversity: kmeans   wraps any other strategy: one pick per k-means
                                cluster of its top m × query (``diversity_pool``: m)

There is one registry (`registry`): each module registers its strategies' names with
`register_strategy`, and this package imports every module in it, so a new strategy touches
one file. Its score columns are computed by the run layer (`starlora.run.pool_scores`).
"""

from __future__ import annotations

import importlib
import pkgutil

from starlora.acquisition.base import LambdaSchedule, QueryStrategy, ScoreTable, minmax
from starlora.acquisition.controls import Length, Random
from starlora.acquisition.dynamic import Dynamic, Subtract
from starlora.acquisition.registry import (
    STRATEGIES,
    StrategyOptions,
    make_strategy,
    register_strategy,
)
from starlora.acquisition.uncertainty import Uncertainty

for _module in pkgutil.iter_modules(__path__):  # every family registers its strategies
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "STRATEGIES", "Dynamic", "LambdaSchedule", "Length", "QueryStrategy", "Random", "ScoreTable",
    "StrategyOptions", "Subtract", "Uncertainty", "make_strategy", "minmax",
    "register_strategy",
]
