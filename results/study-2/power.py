"""Power of study 2's primary tests (issue 35), from the first study's paired spreads.

    python results/study-2/power.py > results/study-2/power.md

Each primary comparison is an exact two-sided sign-flip test of the mean paired AULC
difference over n seeds (all 2^n sign vectors, as `starlora.study.stats`), Holm over the
family. Paired differences are drawn as Normal(delta, sd) with the first study's paired
standard deviations of AULC (results/arith-study/report/study.md: 0.022-0.040). Reported:
the smallest true difference found with 80% power at the Holm family's strictest level
(alpha / m, the level the first rejection needs) and at alpha; and, for the equivalence
verdict against ``pe`` (two one-sided sign-flip tests at alpha, each shifted by the margin),
the chance of declaring equivalence when the true difference is 0. Simulation (NumPy seed
0, 4000 draws a point): each figure is within about +-0.01 of power.
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np


def signs(n: int) -> np.ndarray:
    """All 2^n sign vectors [2^n, n]."""
    return np.array(list(itertools.product((1.0, -1.0), repeat=n)))


def p_two_sided(d: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Exact sign-flip p of mean(d) != 0 for each row of `d` [draws, n]."""
    obs = np.abs(d.mean(1))[:, None]
    null = np.abs(d @ s.T) / d.shape[1]  # [draws, 2^n]
    return (null >= obs - 1e-12).mean(1)


def p_greater(d: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Exact one-sided sign-flip p of mean(d) > 0."""
    obs = d.mean(1)[:, None]
    return ((d @ s.T) / d.shape[1] >= obs - 1e-12).mean(1)


def power(delta: float, sd: float, n: int, alpha: float, s: np.ndarray,
          rng: np.random.Generator, draws: int) -> float:
    d = rng.normal(delta, sd, size=(draws, n))
    return float((p_two_sided(d, s) <= alpha).mean())


def equivalence(margin: float, sd: float, n: int, alpha: float, s: np.ndarray,
                rng: np.random.Generator, draws: int) -> float:
    d = rng.normal(0.0, sd, size=(draws, n))
    above = p_greater(d + margin, s) <= alpha   # mean > -margin
    below = p_greater(margin - d, s) <= alpha   # mean < +margin
    return float((above & below).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=12)
    ap.add_argument("--family", type=int, default=4, help="comparisons under Holm")
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--draws", type=int, default=4000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    s = signs(args.seeds)
    grid = np.round(np.arange(0.005, 0.0801, 0.0025), 4)
    print(f"# Power of study 2's primary tests (n = {args.seeds} seeds, Holm over "
          f"{args.family}, alpha {args.alpha})\n")
    print("Written by `python results/study-2/power.py`; see its docstring for the model.\n")
    print("| paired sd of AULC | detectable difference, 80% power at alpha/m (first Holm step)"
          " | at alpha (last Holm step) |")
    print("|---|---|---|")
    for sd in (0.022, 0.030, 0.040):
        found = []
        for level in (args.alpha / args.family, args.alpha):
            hit = next((float(g) for g in grid
                        if power(float(g), sd, args.seeds, level, s, rng, args.draws) >= 0.8),
                       None)
            found.append(f"{hit:.4f}" if hit is not None else "> 0.08")
        print(f"| {sd:.3f} | {found[0]} | {found[1]} |")
    print("\n| paired sd of AULC | margin | chance of an equivalence verdict when the true "
          "difference is 0 |")
    print("|---|---|---|")
    for sd in (0.022, 0.030, 0.040):
        for margin in (0.02, 0.03):
            eq = equivalence(margin, sd, args.seeds, args.alpha, s, rng, args.draws)
            print(f"| {sd:.3f} | {margin:.2f} | {eq:.2f} |")


if __name__ == "__main__":
    main()
