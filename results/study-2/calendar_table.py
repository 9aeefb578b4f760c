"""The calendar pilot's checks (results/study-2/README.md; exploratory):

    PYTHONPATH=src python results/study-2/calendar_table.py > results/study-2/calendar-pilot.md
    PYTHONPATH=src python results/study-2/calendar_table.py --model "Gemma 3 270M" --parsed \
        --runs results/study-2/pilot-gemma3-270m-calendar/first > results/study-2/gemma-calendar-pilot.md
    PYTHONPATH=src python results/study-2/calendar_table.py --runs results/study-2/runs/calendar/pe \
        --title "Study 2, calendar, pe (exploratory)"   # study 2's arms: exploratory/calendar-steps.md

For each finished run under ``pilot-calendar/first/seed<s>``: accuracy per round
(``metrics.jsonl``), the gain from round 0 (16 labels) to the last round (check 1), accuracy
per ``steps`` level at the last round (check 2: the test items are rebuilt from the run's own
config with `starlora.run.data`, and matched to ``rounds/<last>/predictions.jsonl`` by id), and
the minutes a run took (check 3: the sum of its rounds' ``seconds``).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from starlora.config import load_config
from starlora.io import read_jsonl
from starlora.run.data import load_data, make_task

HERE = Path(__file__).resolve().parent
RUNS = HERE / "pilot-calendar" / "first"


def run_rows(d: Path) -> tuple[list[dict], dict[int, tuple[int, int]]]:
    """(metrics rows, {steps: (correct, total)} at the last round) of one run."""
    rows = list(read_jsonl(d / "metrics.jsonl"))
    config = load_config(d / "config.yaml", stored=True)
    steps = {ex.id: ex.meta["steps"] for ex in load_data(config.task, make_task(config.task)).test}
    last = rows[-1]["round"]
    per: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for p in read_jsonl(d / "rounds" / str(last) / "predictions.jsonl"):
        per[steps[p["id"]]][0] += bool(p["correct"])
        per[steps[p["id"]]][1] += 1
    return rows, {k: (c, n) for k, (c, n) in sorted(per.items())}


def parsed(d: Path) -> float:
    """The share of round 0's test answers with an extracted date (``prediction`` not null)."""
    rows = read_jsonl(d / "rounds" / "0" / "predictions.jsonl")
    return sum(p["prediction"] is not None for p in rows) / len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=Path, default=RUNS, help="default: pilot-calendar/first")
    ap.add_argument("--model", default="SmolLM2", help="the model's name in the title")
    ap.add_argument("--title", help="the title instead of the pilot's (another arm's runs)")
    ap.add_argument("--parsed", action="store_true",
                    help="add the share of round 0's answers parsed (the Gemma pilot's check)")
    args = ap.parse_args()
    runs = sorted(d for d in args.runs.glob("seed*") if d.is_dir()
                  and json.loads((d / "state.json").read_text()).get("finished"))
    pilot = f"Calendar pilot (exploratory): `random`, the first study's recipe, {args.model}"
    print(f"# {args.title or pilot}\n")
    print("| seed | accuracy at 16, 32, ..., 112 labels | gain | 1 / 2 / 3 steps at 112 "
          "| minutes |" + " parsed at 16 |" * args.parsed)
    print("|---|---|---|---|---|" + "---|" * args.parsed)
    gains, levels = [], defaultdict(lambda: [0, 0])
    for d in runs:
        rows, per = run_rows(d)
        acc = [r["accuracy"] for r in rows]
        gains.append(acc[-1] - acc[0])
        for k, (c, n) in per.items():
            levels[k][0] += c
            levels[k][1] += n
        by_steps = " / ".join(f"{c / n:.2f} ({n})" for c, n in per.values())
        minutes = sum(r["seconds"] for r in rows) / 60
        print(f"| {d.name[4:]} | {', '.join(f'{a:.3f}' for a in acc)} | {gains[-1]:+.3f} "
              f"| {by_steps} | {minutes:.0f} |" + f" {parsed(d):.2f} |" * args.parsed)
    pooled = " / ".join(f"{c / n:.2f}" for c, n in (levels[k] for k in sorted(levels)))
    print(f"\nMean gain {np.mean(gains):+.3f} over {len(gains)} runs (check 1: at least +0.05). "
          f"Accuracy per steps level at 112 labels, all runs pooled: {pooled} (check 2: "
          "not every level at 0 or at 1).")


if __name__ == "__main__":
    main()
