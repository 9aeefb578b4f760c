"""Power of study 2's primary tests (issue 35), from the first study's paired spreads.

    python results/study-2/power.py > results/study-2/power.md

Each primary comparison is the study's exact two-sided sign-flip test of the mean paired AULC
difference over n seeds (`starlora.study.stats.sign_flip_p`), Holm over the family; the
equivalence verdict against ``pe`` is its TOST (`starlora.study.stats.tost_p`). Paired
differences are drawn as Normal(delta, sd) with the first study's paired standard deviations
of AULC (results/arith-study/report/study.md: 0.022-0.040). Reported: the smallest true
difference on a 0.0025 grid found with 80% power at the Holm family's strictest level
(alpha / m, what the first rejection needs) and at alpha (the last); and the chance of an
equivalence verdict (TOST p < alpha) when the true difference is 0, for two margins.
Simulation: NumPy seed 0, `--draws` studies a point (each power within about +-0.01).
"""

from __future__ import annotations

import argparse

import numpy as np

from starlora.study.stats import sign_flip_p, tost_p

GRID = np.round(np.arange(0.0025, 0.1001, 0.0025), 4)


def power(delta: float, sd: float, n: int, alpha: float, draws: int) -> float:
    """Share of `draws` simulated studies whose two-sided sign-flip p is <= alpha."""
    rng = np.random.default_rng(0)
    d = rng.normal(delta, sd, size=(draws, n))
    return float(np.mean([sign_flip_p(row) <= alpha for row in d]))


def detectable(sd: float, n: int, alpha: float, draws: int) -> float | None:
    """The smallest grid difference with power >= 0.8 (bisection: power grows with delta)."""
    lo, hi = 0, len(GRID) - 1
    if power(float(GRID[hi]), sd, n, alpha, draws) < 0.8:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if power(float(GRID[mid]), sd, n, alpha, draws) >= 0.8:
            hi = mid
        else:
            lo = mid + 1
    return float(GRID[lo])


def equivalence(margin: float, sd: float, n: int, alpha: float, draws: int) -> float:
    """Share of simulated studies with a true difference of 0 whose TOST p is < alpha."""
    rng = np.random.default_rng(0)
    d = rng.normal(0.0, sd, size=(draws, n))
    return float(np.mean([tost_p(row, margin) < alpha for row in d]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=12)
    ap.add_argument("--family", type=int, default=4, help="comparisons under Holm")
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--draws", type=int, default=2000)
    args = ap.parse_args()
    n = args.seeds
    print(f"# Power of study 2's primary tests (n = {n} paired seeds, Holm over {args.family}, "
          f"alpha {args.alpha})\n")
    print(f"Written by `python results/study-2/power.py` ({args.draws} simulated studies a "
          "point; see its docstring for the model).\n")
    print("| paired sd of AULC | smallest difference with 80% power at alpha/m (first Holm "
          "step) | at alpha (last Holm step) |")
    print("|---|---|---|")
    for sd in (0.022, 0.030, 0.040):
        cells = [detectable(sd, n, level, args.draws) for level in
                 (args.alpha / args.family, args.alpha)]
        print(f"| {sd:.3f} | " + " | ".join(f"{c:.4f}" if c is not None else "> 0.1"
                                           for c in cells) + " |")
    print("\n| paired sd of AULC | equivalence margin | chance of an equivalence verdict when "
          "the true difference is 0 |")
    print("|---|---|---|")
    for sd in (0.022, 0.030, 0.040):
        for margin in (0.02, 0.03):
            print(f"| {sd:.3f} | {margin:.2f} | "
                  f"{equivalence(margin, sd, n, args.alpha, args.draws):.2f} |")


if __name__ == "__main__":
    main()
