"""Interim (exploratory): class balance per round of the OBQA probe's seed-0 runs.

    python results/obqa-probe/balance.py random pe-dynamic pe-dynamic-gold

`starlora report` writes these diagnostics once two arms share two seeds; until then this
prints, per arm and round of `runs/<arm>/seed0`, the share of each predicted letter on the
test set and of each gold letter in the selected batch, as the report computes them
(`starlora.study_diagnostics.run_diagnostics`). Run from the repository root.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from starlora.config import load_config
from starlora.study_diagnostics import run_diagnostics

RUNS = Path(__file__).resolve().parent / "runs"


def main(arms: list[str]) -> int:
    cache: dict = {}
    print("| arm (seed 0) | round | labelled | accuracy | predicted A / B / C / D "
          "| selected gold A / B / C / D |")
    print("|---|---|---|---|---|---|")
    for arm in arms:
        run = RUNS / arm / "seed0"
        cfg = load_config(run / "config.yaml")
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                   if line.strip()]
        out, _ = run_diagnostics(run, cfg.active_learning.strategy, cfg,
                                 [m["round"] for m in metrics], cache)
        for m in metrics:
            d = out.get(m["round"], {})
            pred = " / ".join(f"{d.get(f'predicted={c}', float('nan')):.2f}" for c in "ABCD")
            sel = (" / ".join(f"{d[f'selected gold={c}']:.2f}" for c in "ABCD")
                   if "selected gold=A" in d else "–")
            print(f"| `{arm}` | {m['round']} | {m['n_labelled']} | {m['accuracy']:.3f} | "
                  f"{pred} | {sel} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
