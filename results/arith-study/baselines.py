"""Exploratory (not in the protocol's family): do the plain baselines beat random, and what do
gold answers change?

    python results/arith-study/baselines.py results/arith-study/runs
    python results/arith-study/baselines.py results/study-2/runs/calendar --pair pe:random

The protocol tests only STAR arms against their baselines. A user also asks whether plain PE or
ME beats random, and what scoring gold answers instead of the model's own changes. This prints,
for each pair below, the per-seed AULC difference (arm minus baseline, paired by seed; AULC as
`starlora report` computes it: trapezoid over the labelled count, divided by its range), its
mean and sample std, a 95% percentile bootstrap interval over seeds (2,000 resamples, NumPy
seed 0) and the exact two-sided sign-flip p, **uncorrected**. Only runs that reached the last
round of every other run of the pair are used. ``--pair ARM:BASELINE`` (repeatable) compares
those run directory names instead of the first study's pairs (study 2's exploratory pairs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from starlora.study.stats import aulc, bootstrap_diff_ci, sign_flip_p

#: (arm, baseline) pairs, by run directory name under runs/
PAIRS = [("pe", "random"), ("me", "random"), ("pe-gold", "random"),
         ("pe-gold", "pe"), ("pe-dynamic-gold", "pe-dynamic"), ("me", "pe")]


def seed_aulcs(arm_dir: Path) -> dict[int, tuple[int, float]]:
    """``{seed: (last round, AULC over rounds 0..last)}`` of every run of one arm."""
    out = {}
    for run in sorted(p for p in arm_dir.glob("seed*") if p.is_dir()):
        path = run / "metrics.jsonl"
        if not path.is_file():
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            out[int(run.name[4:])] = (max(r["round"] for r in rows),
                                      aulc([r["n_labelled"] for r in rows],
                                           [r["accuracy"] for r in rows]))
    return out


def pair(text: str) -> tuple[str, str]:
    """``ARM:BASELINE`` (run directory names) as ``(arm, baseline)``."""
    arm, sep, base = text.partition(":")
    if not (arm and sep and base):
        raise argparse.ArgumentTypeError(f"{text!r}: expected ARM:BASELINE, e.g. pe:random")
    return arm, base


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", type=Path, help="the study's runs/ directory (runs/<arm>/seed<s>)")
    ap.add_argument("--pair", action="append", type=pair, metavar="ARM:BASELINE",
                    help="compare these arms (run directory names) instead of PAIRS")
    args = ap.parse_args()
    pairs = args.pair or PAIRS
    values = {p.name: seed_aulcs(p) for p in args.runs.iterdir() if p.is_dir()}
    print("| arm | baseline | n seeds | mean diff | std | 95% CI (seeds) | p (uncorrected) |")
    print("|---|---|---|---|---|---|---|")
    for arm, base in pairs:
        a, b = values.get(arm, {}), values.get(base, {})
        last = max([r for r, _ in (*a.values(), *b.values())], default=0)
        seeds = sorted(s for s in set(a) & set(b) if a[s][0] == b[s][0] == last)
        if len(seeds) < 2:
            continue
        d = np.array([a[s][1] - b[s][1] for s in seeds])
        lo, hi = bootstrap_diff_ci(d)
        print(f"| {arm} | {base} | {len(d)} | {d.mean():.4f} | {d.std(ddof=1):.4f} | "
              f"[{lo:.4f}, {hi:.4f}] | {sign_flip_p(d):.5f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
