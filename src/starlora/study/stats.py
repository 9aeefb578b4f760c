"""Statistics of a paired comparison of active-learning arms: numbers in, numbers out.

Everything here is pure NumPy (scikit-learn for AUROC) and deterministic; `starlora.study` feeds
it run directories.

* `aulc`: the area under a learning curve (trapezoid rule over the labelled count) divided by
  the labelled range, so that accuracies in [0, 1] give an AULC in [0, 1]. It is the weighted
  sum ``aulc_weights(n) @ accuracy``: the one definition the report, the study tables and the
  bootstrap share. `aulc` sums it exactly (``math.fsum``), so a committed table holds the same
  bytes on every CPU; a BLAS dot product rounds as its kernel does (AVX2 and AVX-512 machines
  gave other last digits).
* `sign_flip_p`: the exact two-sided sign-flip (paired permutation) test of a mean of paired
  differences: all 2^n sign vectors are enumerated and p is the fraction whose |mean| is at
  least the observed |mean| less a tolerance (|sum| >= observed |sum| - 1e-9 * max(1, sum |d|)),
  so that float ties count.
  ``alternative="greater"``/``"less"`` gives the one-sided test (the signed sum). `tost_p`:
  equivalence within a margin, two one-sided tests on the shifted differences.
* `holm`: Holm-Bonferroni adjusted p-values of a family, in the family's order.
* `bootstrap_diff_ci`: the percentile interval of a mean paired difference, resampling seeds
  with replacement and, when per-item values are given, test items with replacement too (one
  item resample per replicate, shared by every seed and both arms, as they share the test set).
* `spearman`: rank correlation with average ranks for ties.
* `auroc`: the area under the ROC curve of scores for a binary class (scikit-learn's
  ``roc_auc_score``: ties between a positive and a negative count 1/2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: float ties in the sign-flip test: |sum| >= observed |sum| - REL_TOL * max(1, sum |d|)
REL_TOL = 1e-9
#: the most paired values `sign_flip_p` enumerates exactly (2^30 sign vectors)
MAX_EXACT = 30


def aulc_weights(n_labelled: Sequence[float]) -> np.ndarray:
    """Weights ``w`` (in the order given, summing to 1) such that ``w @ accuracy`` is the
    trapezoid area under (n_labelled, accuracy) divided by the labelled range; equal weights
    when the range is 0 (a single point gives its own accuracy)."""
    x = np.asarray(n_labelled, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError("aulc needs at least one point")
    order = np.argsort(x, kind="stable")
    xs = x[order]
    span = xs[-1] - xs[0]
    if span == 0:
        return np.full(len(x), 1.0 / len(x))
    gaps = np.diff(xs)
    sorted_w = np.zeros(len(x))
    sorted_w[:-1] += gaps / 2
    sorted_w[1:] += gaps / 2
    w = np.empty(len(x))
    w[order] = sorted_w / span
    return w


def aulc(n_labelled: Sequence[float], accuracy: Sequence[float]) -> float:
    """Area under the learning curve (trapezoid rule) divided by the labelled range, in [0, 1]
    for accuracies in [0, 1]; a single point gives its own accuracy. Order-free. The correctly
    rounded sum of the weighted accuracies, the same on every machine (module doc)."""
    weighted = aulc_weights(n_labelled) * np.asarray(accuracy, dtype=np.float64)
    return math.fsum(weighted.tolist())


def first_reach(n_labelled: Sequence[float], accuracy: Sequence[float], target: float) -> float:
    """The labelled count at which the curve (`n_labelled` ascending, `accuracy` at each)
    first reaches `target`, linear between points: `n_labelled[0]` when it starts there,
    inf when it never does."""
    n, a = np.asarray(n_labelled, np.float64), np.asarray(accuracy, np.float64)
    if a[0] >= target:
        return float(n[0])
    for k in range(1, len(a)):
        if a[k] >= target:
            return float(n[k - 1] + (target - a[k - 1]) / (a[k] - a[k - 1]) * (n[k] - n[k - 1]))
    return float("inf")


def sign_flip_p(diffs: Sequence[float], alternative: str = "two-sided") -> float:
    """Exact p-value of the sign-flip test of mean(diffs) = 0 (see module doc).

    `alternative`: ``"two-sided"`` (|sum| as the statistic), ``"greater"`` (H1: mean > 0; the
    share of sign vectors whose sum is at least the observed sum) or ``"less"`` (H1: mean < 0).
    With n values, p is a multiple of 2^-n; all values equal to 0 give p = 1.
    """
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative must be two-sided, greater or less, not {alternative!r}")
    d = np.asarray(diffs, dtype=np.float64)
    n = len(d)
    if n == 0:
        raise ValueError("sign_flip_p needs at least one difference")
    if n > MAX_EXACT:
        raise ValueError(f"exact sign-flip test of {n} pairs is too large (at most {MAX_EXACT})")
    if alternative == "less":
        d = -d
    one_sided = alternative != "two-sided"
    observed = d.sum() if one_sided else abs(d.sum())
    tol = REL_TOL * max(1.0, float(np.abs(d).sum()))
    low = min(n, 16)  # sums over all sign vectors of the first `low` values, enumerated at once
    signs = 1.0 - 2.0 * ((np.arange(2**low)[:, None] >> np.arange(low)) & 1)
    low_sums = signs @ d[:low]
    count = 0
    for high in range(2 ** (n - low)):  # the remaining values' signs, one vector at a time
        rest = sum(-v if (high >> j) & 1 else v for j, v in enumerate(d[low:]))
        sums = low_sums + rest
        count += int(np.count_nonzero((sums if one_sided else np.abs(sums)) >= observed - tol))
    return count / 2**n


def min_sign_flip_p(n: int) -> float:
    """The smallest p `sign_flip_p` can give (two-sided) with `n` paired values: 2 / 2^n, when
    every value has the same sign (1 for a single value)."""
    if n < 1:
        raise ValueError("min_sign_flip_p needs at least one value")
    return min(1.0, 2.0 / 2**n)


def tost_p(diffs: Sequence[float], margin: float) -> float:
    """Two one-sided sign-flip tests of equivalence within ±`margin` (same unit as `diffs`):
    p = max(p of mean > -margin, p of mean < +margin), each the exact one-sided test of
    `sign_flip_p` on the differences shifted by the margin. p < alpha says the mean paired
    difference lies within the margin."""
    if margin <= 0:
        raise ValueError(f"margin must be positive, got {margin}")
    d = np.asarray(diffs, dtype=np.float64)
    return max(sign_flip_p(d + margin, "greater"), sign_flip_p(d - margin, "less"))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the order given: the i-th smallest p (0-based)
    times (m - i), made non-decreasing in that order and capped at 1."""
    p = np.asarray(pvalues, dtype=np.float64)
    m = len(p)
    out = np.empty(m)
    running = 0.0
    for i, j in enumerate(np.argsort(p, kind="stable")):
        running = max(running, min(1.0, (m - i) * p[j]))
        out[j] = running
    return [float(x) for x in out]


def bootstrap_diff_ci(
    seed_diffs: Sequence[float] | None = None,
    item_diffs: np.ndarray | None = None,
    *,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of the mean paired difference over seeds.

    `item_diffs` [n seeds, m items]: per seed, each test item's contribution to the difference,
    so that a seed's difference on a resample of items is the mean of its resampled
    contributions (for AULC: per-item correctness weighted by `aulc_weights`, arm A minus arm
    B). Each replicate draws n seeds and m items with replacement (the same items for every
    seed). Without `item_diffs`, only seeds are resampled from `seed_diffs` [n]. Deterministic
    for a given `seed`.
    """
    rng = np.random.default_rng(seed)
    if item_diffs is None:
        d = np.asarray(seed_diffs, dtype=np.float64)
        n = len(d)
        draws = rng.integers(0, n, size=(resamples, n))
        means = d[draws].mean(axis=1)
    else:
        v = np.asarray(item_diffs, dtype=np.float64)
        n, m = v.shape
        means = np.empty(resamples)
        for start in range(0, resamples, 250):  # a chunk of replicates at a time
            b = min(250, resamples - start)
            seeds = rng.integers(0, n, size=(b, n))
            items = rng.integers(0, m, size=(b, m))
            seed_counts = np.zeros((b, n))
            item_counts = np.zeros((b, m))
            np.add.at(seed_counts, (np.arange(b)[:, None], seeds), 1.0)
            np.add.at(item_counts, (np.arange(b)[:, None], items), 1.0)
            means[start : start + b] = np.einsum("bn,nm,bm->b", seed_counts, v, item_counts)
        means /= n * m
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    xs = x[order]
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or xs[end] != xs[start]:
            ranks[order[start:end]] = (start + end + 1) / 2
            start = end
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson of average ranks); NaN when either is constant or
    there are fewer than 2 values."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"spearman: shapes {a.shape} and {b.shape} differ")
    if len(a) < 2:
        return float("nan")
    ra, rb = _ranks(a) - (len(a) + 1) / 2, _ranks(b) - (len(b) + 1) / 2
    denom = np.sqrt((ra @ ra) * (rb @ rb))
    return float(ra @ rb / denom) if denom > 0 else float("nan")


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Area under the ROC curve of `scores` for predicting `positive`: the probability that a
    positive item scores higher than a negative one, a tie counting 1/2 (scikit-learn's
    ``roc_auc_score``). NaN when either class is empty; scores must be
    finite (ValueError otherwise)."""
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    if s.shape != pos.shape or s.ndim != 1:
        raise ValueError(f"auroc: shapes {s.shape} and {pos.shape} differ or are not 1-D")
    if not np.isfinite(s).all():
        raise ValueError("auroc: scores must be finite")
    if pos.all() or not pos.any():
        return float("nan")
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(pos, s))
