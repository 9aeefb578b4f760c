"""Self-consistency over sampled answers: pure functions of the final answers a task's
`extract` took from K generations of one prompt (no model here).

An answer is a string, or None where no final answer could be extracted; None is a class of
its own, equal only to None. Answers are compared exactly: normalising them (numbers,
letters, case) is the task's `extract`'s job.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence


def _checked(answers: Sequence[str | None]) -> Sequence[str | None]:
    if len(answers) == 0:
        raise ValueError("self-consistency of no answers: at least one sample is needed")
    return answers


def answer_entropy(answers: Sequence[str | None]) -> float:
    """Entropy (nats) of the empirical distribution of `answers` [K]: -Σ_c p_c·log p_c over
    the distinct answers c, p_c = count(c)/K, None its own class. 0 when all K agree,
    log K when all differ (an exact-match-cluster semantic entropy, Kuhn et al. 2023)."""
    counts = Counter(_checked(answers)).values()
    k = len(answers)
    return float(sum(c / k * math.log(k / c) for c in counts if c < k))


def agreement(answers: Sequence[str | None], reference: str | None) -> float:
    """Share of `answers` [K] equal to `reference` (None equals None), in [0, 1]."""
    return sum(a == reference for a in _checked(answers)) / len(answers)


def disagreement(answers: Sequence[str | None], reference: str | None) -> float:
    """1 - `agreement`: the share of sampled answers that differ from `reference` (e.g. the
    greedy answer's), in [0, 1]."""
    return 1.0 - agreement(answers, reference)
