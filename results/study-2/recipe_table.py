"""The training-recipe pilot's table (results/study-2/README.md; exploratory, pilot seeds).

    python results/study-2/recipe_table.py > results/study-2/recipe-pilot.md

Per recipe, over its finished runs under results/study-2/pilot/<recipe>/seed*: the share of
falling steps (accuracy at round k+1 below round k's, out of every consecutive pair of
rounds), the largest fall, the mean AULC (`starlora.study.stats.aulc`) and the mean final
accuracy. The first study's own pilot runs (results/arith-study/pilot/random, the `first`
recipe, older code on another CPU) are a row of their own.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from starlora.io import read_jsonl
from starlora.study.stats import aulc

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from launch import finished  # noqa: E402  (results/launch.py)
from run_recipe_pilot import RECIPES  # noqa: E402  (the one list of recipes)


def curves(folder: Path) -> list[list[tuple[int, float]]]:
    """(labelled count, accuracy) per round of each finished run under `folder`."""
    return [[(r["n_labelled"], r["accuracy"]) for r in read_jsonl(run / "metrics.jsonl")]
            for run in sorted(folder.glob("seed*")) if run.is_dir() and finished(run)]


def row(name: str, runs: list[list[tuple[int, float]]]) -> str:
    pairs = [(a[1], b[1]) for c in runs for a, b in zip(c, c[1:])]
    falls = [a - b for a, b in pairs if b < a]
    areas = [aulc([n for n, _ in c], [x for _, x in c]) for c in runs]
    return (f"| {name} | {len(runs)} | {len(falls)} of {len(pairs)} ({len(falls) / len(pairs):.2f})"
            f" | {max(falls, default=0.0):.3f} | {np.mean(areas):.4f} | "
            f"{np.mean([c[-1][1] for c in runs]):.3f} |")


def main() -> None:
    print("# Training-recipe pilot (issue 35; exploratory, seeds 100-102)\n")
    print("Written by `python results/study-2/recipe_table.py`; the design and the rule that "
          "picks the recipe are in README.md.\n")
    print("| recipe | runs | falling steps | largest fall | mean AULC | mean final accuracy |")
    print("|---|---|---|---|---|---|")
    first = curves(HERE.parent / "arith-study" / "pilot" / "random")
    if first:
        print(row("first (the first study's pilot: older code, AMD Zen 4)", first))
    for recipe in RECIPES:
        runs = curves(HERE / "pilot" / recipe)
        if runs:
            print(row(recipe, runs))


if __name__ == "__main__":
    main()
