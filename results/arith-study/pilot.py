"""The pilot behind results/PROTOCOL.md: AULC spread of `random` over seeds, and the smallest
mean AULC difference the study's sign-flip test detects.

    python results/arith-study/pilot.py results/arith-study/pilot/random/seed*

For each pilot run: AULC (`starlora.study.stats.aulc`) from its metrics.jsonl. The spread of a
paired difference between two arms is taken as sqrt(2) x the standard deviation of random's
AULC over seeds (as if the two arms' AULCs of a seed were independent; pairing by seed only
makes it smaller). For n paired seeds and a true mean difference d, the power of the exact
two-sided sign-flip test at level alpha is estimated by simulating normal differences
(10,000 draws, NumPy seed 0); the detectable difference is the smallest d on a 0.001 grid with
power >= 0.8 (bisection).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

from starlora.study.stats import aulc


def run_aulc(run_dir: Path) -> tuple[float, list[tuple[int, float]]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    curve = [(r["n_labelled"], r["accuracy"]) for r in rows]
    return aulc([c[0] for c in curve], [c[1] for c in curve]), curve


def power(n: int, d: float, sd: float, alpha: float, draws: int = 10_000) -> float:
    """Share of simulated studies (n paired differences ~ N(d, sd^2)) whose exact two-sided
    sign-flip p is <= alpha."""
    rng = np.random.default_rng(0)
    x = rng.normal(d, sd, size=(draws, n))
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))  # [2^n, n]
    observed = np.abs(x.sum(axis=1))  # [draws]
    flipped = np.abs(x @ signs.T)  # [draws, 2^n]
    p = (flipped >= observed[:, None] - 1e-12).mean(axis=1)
    return float((p <= alpha).mean())


def detectable(n: int, sd: float, alpha: float) -> float:
    if 2 / 2**n > alpha:
        return float("inf")  # no outcome reaches alpha
    low, high = 0, 1000  # in thousandths; the same draws for every d make power rise with d
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if power(n, mid / 1000, sd, alpha) < 0.8 else (low, mid)
    return high / 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dirs", nargs="+", type=Path)
    ap.add_argument("--comparisons", type=int, default=8, help="size of the Holm family")
    args = ap.parse_args()
    values = []
    for run_dir in args.run_dirs:
        value, curve = run_aulc(run_dir)
        values.append(value)
        points = ", ".join(f"{n}: {a:.3f}" for n, a in curve)
        print(f"{run_dir}: AULC {value:.4f}  ({points})")
    sd = float(np.std(values, ddof=1))
    sd_diff = float(np.sqrt(2) * sd)
    print(f"random AULC over {len(values)} seeds: mean {np.mean(values):.4f}, sd {sd:.4f}; "
          f"assumed sd of a paired difference: {sd_diff:.4f}")
    m = args.comparisons
    print(f"detectable mean AULC difference (80% power), exact sign-flip test, sd {sd_diff:.4f}:")
    print(f"| seeds | alpha 0.05 | alpha 0.05/{m} (Holm's first step) |")
    print("|---|---|---|")
    for n in (6, 8, 10, 12):
        a, b = detectable(n, sd_diff, 0.05), detectable(n, sd_diff, 0.05 / m)
        print(f"| {n} | {a:.3f} | {b:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
