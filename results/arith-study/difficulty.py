"""Exploratory (not in the protocol): does each uncertainty track how hard a problem is?

    python results/arith-study/difficulty.py results/arith-study/runs

For every arm that stores a base term (`pe_base` / `me_base` in its scores) and every round,
the Spearman correlation over the 200 scored pool items between the number of steps of a
problem (1, 2 or 3) and (a) the base model's uncertainty, (b) the adapted model's uncertainty,
as `rounds/<k>/scores.jsonl` stores them: on the model's own greedy answer for the arms on
generated answers, on the gold answer for the `-gold` arms. Mean ± sample std over the seeds.
The steps are rebuilt from each run's config (`starlora.study.diagnostics.pool_facts`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from starlora.config import load_config
from starlora.study.diagnostics import pool_facts, read_rows
from starlora.study.stats import spearman


def arm_rows(arm_dir: Path, cache: dict) -> list[tuple[int, str, float, float]]:
    """``[(round, measure, rho(base, steps), rho(full, steps))]`` of every seed of one arm."""
    out = []
    for run in sorted(p for p in arm_dir.glob("seed*") if p.is_dir()):
        steps = pool_facts(load_config(run / "config.yaml", stored=True), cache).values
        for scores in sorted(run.glob("rounds/*/scores.jsonl"), key=lambda p: int(p.parent.name)):
            rows = read_rows(scores) or []
            for m in ("pe", "me"):
                if rows and all(f"{m}_base" in r and m in r for r in rows):
                    s = [steps[r["id"]] for r in rows]
                    out.append((int(scores.parent.name), m,
                                spearman([r[f"{m}_base"] for r in rows], s),
                                spearman([r[m] for r in rows], s)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", type=Path, help="the study's runs/ directory (runs/<arm>/seed<s>)")
    args = ap.parse_args()
    cache: dict = {}
    print("| arm | round | measure | seeds | rho(base, steps) | rho(adapted, steps) |")
    print("|---|---|---|---|---|---|")
    for arm_dir in sorted(p for p in args.runs.iterdir() if p.is_dir()):
        rows = arm_rows(arm_dir, cache)
        for k, m in sorted({(k, m) for k, m, _, _ in rows}):
            base = [b for kk, mm, b, _ in rows if (kk, mm) == (k, m)]
            full = [f for kk, mm, _, f in rows if (kk, mm) == (k, m)]
            print(f"| {arm_dir.name} | {k} | {m.upper()} | {len(base)} | "
                  f"{np.mean(base):.3f} ± {np.std(base, ddof=1):.3f} | "
                  f"{np.mean(full):.3f} ± {np.std(full, ddof=1):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
