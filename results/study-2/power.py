"""Power of the confirmatory study's tests (issue 35), from the first study's paired spread.

    python results/study-2/power.py > results/study-2/power.md

Not a result: a planning computation for results/study-2/PROTOCOL.md (not yet written; it waits
on the screen's choice of arms). It reads the committed arith study (results/arith-study/runs,
seeds 0-9) and simulates, reading no new run.

1. **Spread.** The AULC of every run (`starlora.study.stats.aulc` of its metrics.jsonl), and per
   pair of arms that the study compared on the model's own answers, the sample standard
   deviation over seeds of the paired difference.
2. **Superiority power.** The study-2 design: n = 12 paired seeds (10-21), the exact two-sided
   sign-flip test (`sign_flip_p`), Holm over a family of m = 4 comparisons (two arms, each
   against `random` and against `pe`), or m = 6 with a fifth arm (issue 35: "say what it costs
   in power"). Holm rejects the smallest p when p < 0.05 / m, so the power of a comparison is
   at least that of the Bonferroni test at 0.05 / m (0.0125, 0.0083), the bound computed
   here. Paired differences are drawn Normal(effect, sd), 4,000 replicates per
   cell (NumPy seed 0); the smallest effect with power >= 0.8 is the detectable effect.
3. **Equivalence power.** The TOST against `pe` with margin ±0.02 (the issue's example) or
   ±0.03 AULC (`tost_p`, alpha 0.05, not in the Holm family): the probability of concluding
   equivalence when the true difference is 0, 0.005 or 0.01.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from starlora.io import read_jsonl
from starlora.study.stats import aulc, sign_flip_p, tost_p

RUNS = Path(__file__).resolve().parents[1] / "arith-study" / "runs"
OWN = ("random", "pe", "me", "pe-dynamic", "me-dynamic", "pe-dynamic-no-constraints")
SEEDS_NEW, FAMILIES, ALPHA, MARGINS = 12, (4, 6), 0.05, (0.02, 0.03)
EFFECTS = [round(0.005 * i, 3) for i in range(0, 11)]
REPLICATES = 4000


def run_aulc(arm: str, seed: int) -> float:
    rows = read_jsonl(RUNS / arm / f"seed{seed}" / "metrics.jsonl")
    return aulc([r["n_labelled"] for r in rows], [r["accuracy"] for r in rows])


def main() -> None:
    seeds = range(10)
    values = {arm: np.array([run_aulc(arm, s) for s in seeds]) for arm in OWN}
    print("# Power of study 2's tests (planning; not a result)\n")
    print("Command: `python results/study-2/power.py > results/study-2/power.md` "
          "(see its docstring).\n")
    print("## Paired spread in the first study (AULC, seeds 0-9, the model's own answers)\n")
    print("| arm | baseline | mean diff | sd of paired diff |\n|---|---|---|---|")
    sds = []
    for a, b in itertools.combinations(OWN, 2):
        d = values[a] - values[b]
        sds.append(d.std(ddof=1))
        print(f"| `{a}` | `{b}` | {d.mean():+.4f} | {d.std(ddof=1):.4f} |")
    print(f"\nsd over these {len(sds)} pairs: min {min(sds):.4f}, median "
          f"{np.median(sds):.4f}, max {max(sds):.4f}.\n")

    rng = np.random.default_rng(0)
    grid = [0.022, 0.030, 0.040]
    noise = rng.standard_normal((REPLICATES, SEEDS_NEW))
    for family in FAMILIES:
        superiority(family, grid, noise)

    print(f"## Equivalence to `pe`: TOST, alpha {ALPHA}, n = {SEEDS_NEW}\n")
    print("| margin | true diff | " + " | ".join(f"P(equivalent), sd {s}" for s in grid) + " |")
    print("|---|---|" + "---|" * len(grid))
    for margin in MARGINS:
        for true in (0.0, 0.005, 0.01):
            cells = [f"{np.mean([tost_p(true + s * z, margin) < ALPHA for z in noise]):.2f}"
                     for s in grid]
            print(f"| ±{margin} | {true:.3f} | " + " | ".join(cells) + " |")


def superiority(family: int, grid: list[float], noise: np.ndarray) -> None:
    """The power table of the sign-flip test at the Bonferroni level of a family of
    `family` comparisons, one column per paired sd in `grid`, over `noise` [replicates,
    seeds] of standard Normal draws (the same for every family)."""
    level = ALPHA / family
    print(f"## Superiority: n = {SEEDS_NEW}, exact sign-flip, Holm over {family} "
          f"(bounded by Bonferroni, p < {level:.4g})\n")
    print("| effect | " + " | ".join(f"power, sd {s}" for s in grid) + " |")
    print("|---|" + "---|" * len(grid))
    detectable: dict[float, float] = {}
    for effect in EFFECTS:
        cells = []
        for s in grid:
            power = np.mean([sign_flip_p(effect + s * z) < level for z in noise])
            if power >= 0.8 and s not in detectable:
                detectable[s] = effect
            cells.append(f"{power:.2f}")
        print(f"| {effect:.3f} | " + " | ".join(cells) + " |")
    print("\nDetectable effect (power >= 0.8): " + "; ".join(
        f"sd {s}: {detectable.get(s, f'> {EFFECTS[-1]}')}" for s in grid) + " AULC.\n")


if __name__ == "__main__":
    main()
