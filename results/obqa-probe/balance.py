"""Exploratory: class balance per round of the OBQA probe's runs, per seed and summarised.

    python results/obqa-probe/balance.py random pe-dynamic pe-dynamic-gold
    python results/obqa-probe/balance.py --seeds 0 random pe-dynamic pe-dynamic-gold

For each arm, seed and round of ``runs/<arm>/seed<s>`` (every seed that has a
``metrics.jsonl``, or those given), the share of each predicted letter on the test set and of
each gold letter in the selected batch, as the report computes them
(`starlora.study.diagnostics.run_diagnostics`). Then a summary table over the seeds: the share
of the most frequent letter, for the test predictions and for the selected batch, as its mean
and range (min to max) over the seeds. 0.25 is an even spread over the four letters; 1.0 is
every item on one letter. The report averages each letter's share over seeds, which hides a
collapse onto a different letter in each seed; the top-letter share does not. The last
column is the selected batch's share of gold answers on the letter the model predicted most
that round (0.25 if selection ignores it). Run from the repository root.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from starlora.config import load_config
from starlora.study.diagnostics import run_diagnostics

RUNS = Path(__file__).resolve().parent / "runs"
LETTERS = "ABCD"


def rounds_of(run: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl (one per finished round)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def top_share(d: dict[str, float], prefix: str) -> float | None:
    """The largest of the shares ``<prefix>=A`` .. ``<prefix>=D`` in `d`; None if absent."""
    shares = [d[f"{prefix}={c}"] for c in LETTERS if f"{prefix}={c}" in d]
    return max(shares) if shares else None


def share_of_top_predicted(d: dict[str, float]) -> float | None:
    """The selected batch's share of gold answers on the letter the model predicts most."""
    preds = {c: d[f"predicted={c}"] for c in LETTERS if f"predicted={c}" in d}
    if not preds or f"selected gold={LETTERS[0]}" not in d:
        return None
    top = max(preds, key=lambda c: (preds[c], c))
    return d[f"selected gold={top}"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("arms", nargs="+")
    ap.add_argument("--seeds", default=None, help="comma-separated (default: every seed run)")
    args = ap.parse_args()
    cache: dict = {}
    # arm -> round -> over seeds: (top predicted share, top selected share, selected share of
    # the top predicted letter); None where the round selects nothing
    summary: dict[str, dict[int, list[tuple[float | None, ...]]]] = {}
    print("| arm | seed | round | labelled | accuracy | predicted A / B / C / D "
          "| selected gold A / B / C / D |")
    print("|---|---|---|---|---|---|---|")
    for arm in args.arms:
        if args.seeds is None:
            runs = sorted((p for p in (RUNS / arm).glob("seed*") if p.is_dir()),
                          key=lambda p: int(p.name[4:]))
        else:
            runs = [RUNS / arm / f"seed{s}" for s in args.seeds.split(",") if s]
        for run in runs:
            metrics = rounds_of(run)
            if not metrics:
                continue
            cfg = load_config(run / "config.yaml", stored=True)
            out, _ = run_diagnostics(run, cfg.active_learning.strategy, cfg,
                                     [m["round"] for m in metrics], cache)
            for m in metrics:
                d = out.get(m["round"], {})
                pred = " / ".join(f"{d.get(f'predicted={c}', float('nan')):.2f}"
                                  for c in LETTERS)
                sel = (" / ".join(f"{d[f'selected gold={c}']:.2f}" for c in LETTERS)
                       if "selected gold=A" in d else "–")
                print(f"| `{arm}` | {run.name[4:]} | {m['round']} | {m['n_labelled']} | "
                      f"{m['accuracy']:.3f} | {pred} | {sel} |")
                summary.setdefault(arm, {}).setdefault(m["round"], []).append(
                    (top_share(d, "predicted"), top_share(d, "selected gold"),
                     share_of_top_predicted(d)))
    print()
    print("| arm | round | seeds | top predicted letter: mean (min to max) "
          "| top selected letter: mean (min to max) "
          "| selected on the top predicted letter: mean (min to max) |")
    print("|---|---|---|---|---|---|")
    for arm, by_round in summary.items():
        for k, rows in sorted(by_round.items()):
            cells = []
            for i in (0, 1, 2):
                xs = [r[i] for r in rows if r[i] is not None]
                cells.append(f"{sum(xs) / len(xs):.2f} ({min(xs):.2f} to {max(xs):.2f})"
                             if xs else "–")
            print(f"| `{arm}` | {k} | {len(rows)} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
