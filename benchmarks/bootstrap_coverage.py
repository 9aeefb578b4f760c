"""Coverage of the study's seeds-only interval: how often the 95% percentile bootstrap of a
mean paired difference (`starlora.study.stats.bootstrap_diff_ci`, 2000 resamples) holds the
true mean, for n seeds of normal differences (the mean and spread do not matter: the interval
moves and scales with the data).

    PYTHONPATH=src python benchmarks/bootstrap_coverage.py [TRIALS]

prints one line per n: the share of TRIALS (default 4000) simulated studies whose interval
holds the true mean, with its binomial standard error."""

from __future__ import annotations

import sys

import numpy as np

from starlora.study.stats import bootstrap_diff_ci


def coverage(n: int, trials: int, rng: np.random.Generator) -> float:
    """Share of `trials` samples of n N(0, 1) differences whose interval holds 0."""
    hits = 0
    for t in range(trials):
        lo, hi = bootstrap_diff_ci(rng.normal(size=n), resamples=2000, seed=t)
        hits += lo <= 0.0 <= hi
    return hits / trials


if __name__ == "__main__":
    trials = int(sys.argv[1]) if len(sys.argv) > 1 else 4000
    rng = np.random.default_rng(0)
    for n in (2, 3, 6, 12):
        c = coverage(n, trials, rng)
        print(f"n={n:2d}: coverage {c:.3f} (se {np.sqrt(c * (1 - c) / trials):.3f})")
