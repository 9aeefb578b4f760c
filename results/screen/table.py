"""The screen's table (results/screen/README.md; exploratory): AULC per arm and seed, and the
batch composition by a problem's number of steps.

    python results/screen/table.py > results/screen/screen.md

For each arm of arms.yaml and each seed 0-2: the run ``results/screen/runs/<arm>/seed<s>``,
or, for an arm marked ``study: true`` without a screen run, the committed study's
``results/arith-study/runs/<arm>/seed<s>``. A run counts when it is finished. AULC and final
accuracy from ``metrics.jsonl`` (`starlora.study.stats.aulc`, the study's definition), the
paired difference from ``random`` per seed, and the share of 1-, 2- and 3-step problems among
the items each arm selected (``rounds/<k>/selected.jsonl``, every query; and the first query
alone), next to the pool's shares; and, for the arms that rank by one column of
``scores.jsonl`` (`TIE_COLUMNS`), how much of each query the random tie-break chose: the
scored items tied with the query's last pick, and the share of the query drawn among them.
No test, no correction: it ranks arms for the confirmatory study, it does not decide between
them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import yaml

from starlora.config import load_config
from starlora.io import read_jsonl
from starlora.study.diagnostics import pool_facts
from starlora.study.stats import aulc

HERE = Path(__file__).resolve().parent
STUDY_RUNS = HERE.parent / "arith-study" / "runs"


def run_dir(arm: str, seed: int, spec: dict, runs: Path) -> Path | None:
    for root in [runs] + ([STUDY_RUNS] if spec.get("study") else []):
        d = root / arm / f"seed{seed}"
        try:
            if json.loads((d / "state.json").read_text()).get("finished"):
                return d
        except (OSError, ValueError):
            continue
    return None


#: the arms that rank the scored items by one column of scores.jsonl, and that column
TIE_COLUMNS = {"pe": "pe", "pe-per_token": "pe", "answer_entropy": "answer_entropy",
               "disagreement": "disagreement", "length": "answer_tokens"}


def ties(run: Path, column: str, query: int) -> list[tuple[int, float]]:
    """Per query of `run` (``rounds/<k>/scores.jsonl``): (scored items whose `column` equals
    the query's `query`-th highest value, share of the query that the tie-break drew among
    them). A column without ties at the cut gives (1, 0.0)."""
    out = []
    for path in sorted(run.glob("rounds/*/scores.jsonl"), key=lambda p: int(p.parent.name)):
        values = np.sort([r[column] for r in read_jsonl(path)])[::-1]
        if len(values) <= query:
            continue
        cut = values[query - 1]
        tied, above = int(np.sum(values == cut)), int(np.sum(values > cut))
        out.append((tied, (query - above) / query if tied > query - above else 0.0))
    return out


def _area(rows: list[dict]) -> float:
    return aulc([m["n_labelled"] for m in rows], [m["accuracy"] for m in rows])


def _curves(arms: dict[str, dict], runs: Path, seeds: tuple[int, ...]
            ) -> tuple[dict[str, dict[int, list[dict]]], list[str]]:
    """The screen's finished runs' metrics (study runs do not count), arm -> seed -> rows,
    and the runs of `seeds` not finished ("arm seed s")."""
    curves: dict[str, dict[int, list[dict]]] = {}
    missing = []
    for arm in arms:
        for seed in seeds:
            d = run_dir(arm, seed, {}, runs)
            if d is None:
                missing.append(f"{arm} seed {seed}")
            else:
                curves.setdefault(arm, {})[seed] = read_jsonl(d / "metrics.jsonl")
    return curves, missing


def ranked(curves: dict[str, dict[int, list[dict]]], candidates: list[str],
           seeds: dict[str, list[int]] | None = None) -> list[tuple[str, float, float]]:
    """`candidates` as (arm, mean paired AULC difference from `random`, mean final accuracy),
    best first (ties: the higher final accuracy); each arm over `seeds[arm]` (default: every
    seed it has)."""
    stats = []
    for arm in candidates:
        own = (seeds or {}).get(arm) or sorted(curves[arm])
        diff = np.mean([_area(curves[arm][s]) - _area(curves["random"][s]) for s in own])
        final = np.mean([curves[arm][s][-1]["accuracy"] for s in own])
        stats.append((arm, float(diff), float(final)))
    return sorted(stats, key=lambda t: (-t[1], -t[2]))


def seed_2_arms(arms: dict[str, dict], runs: Path, quiet: bool = False) -> list[str] | None:
    """The amendment of 2026-12-05 (README.md): once every arm has finished screen runs of
    seeds 0 and 1 (the study's runs do not count here), rank the arms other than `random` and
    `pe` by their mean paired AULC difference from `random` over those seeds (ties: the higher
    mean final accuracy); seed 2 is run for `random`, `pe` and the first three. Prints the
    ranking and the command (unless `quiet`) and returns those five arms; None while a run is
    missing."""
    curves, missing = _curves(arms, runs, (0, 1))
    if missing:
        print(f"not yet: {len(missing)} runs unfinished ({', '.join(missing)})", file=sys.stderr)
        return None
    order = ranked(curves, [a for a in arms if a not in ("random", "pe")],
                   {a: [0, 1] for a in arms})
    chosen = ["random", "pe", *[a for a, _, _ in order[:3]]]
    if not quiet:
        for i, (arm, diff, final) in enumerate(order, 1):
            print(f"{i}. {arm}: mean AULC difference from random {diff:+.4f}, "
                  f"mean final accuracy {final:.3f}")
        print("python results/screen/run_screen.py --seeds 2 --arms " + ",".join(chosen))
    return chosen


#: study 2's arms 3 and 4 (results/study-2/protocol-draft.md, "Arms"): the STAR variants, and
#: the new label-free arms that are not STAR (`length` is a control, not a candidate)
STAR_VARIANTS = ("pe-dynamic-adapted", "pe-dynamic-raw_full")
NEW_ARMS = ("pe-per_token", "answer_entropy", "disagreement", "typiclust", "pe-kmeans")


def study_arms(arms: dict[str, dict], runs: Path) -> int:
    """Study 2's arms by the protocol draft's rules, on the finished screen (every arm's seeds
    0 and 1, and seed 2 of the amendment's five): arm 3 is the STAR variant with the higher
    mean paired AULC difference from `random` over the seeds both have; arm 4 the new arm
    with the highest one over the seeds it has (2 or 3); ties: the higher mean final
    accuracy. Prints both rankings and the arms; exit 1 until the screen has finished."""
    chosen = seed_2_arms(arms, runs, quiet=True)
    if chosen is None:
        return 1
    curves, missing = _curves(chosen, runs, (2,))
    if missing:
        print(f"not yet: seed 2 of {', '.join(missing)}", file=sys.stderr)
        return 1
    curves, _ = _curves(arms, runs, (0, 1, 2))
    both = sorted(set(curves[STAR_VARIANTS[0]]) & set(curves[STAR_VARIANTS[1]]))
    star = ranked(curves, list(STAR_VARIANTS), {a: both for a in STAR_VARIANTS})
    new = ranked(curves, list(NEW_ARMS))
    for title, order in (("arm 3 (STAR, seeds " + ",".join(map(str, both)) + ")", star),
                         ("arm 4 (new label-free arms, each over its seeds)", new)):
        print(title + ":")
        for arm, diff, final in order:
            print(f"  {arm}: mean AULC difference from random {diff:+.4f} "
                  f"({len(curves[arm]) if 'arm 4' in title else len(both)} seeds), "
                  f"mean final accuracy {final:.3f}")
    print(f"arms: random, pe, {star[0][0]}, {new[0][0]}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs-dir", type=Path, default=HERE / "runs")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--seed-2-arms", action="store_true",
                    help="print the arms the README's amendment runs seed 2 for, and stop")
    ap.add_argument("--study-arms", action="store_true",
                    help="print study 2's arms 3 and 4 by its protocol's rules, and stop")
    args = ap.parse_args()
    arms: dict[str, dict] = yaml.safe_load((HERE / "arms.yaml").read_text())
    if args.seed_2_arms:
        return 0 if seed_2_arms(arms, args.runs_dir) else 1
    if args.study_arms:
        return study_arms(arms, args.runs_dir)
    seeds = [int(s) for s in args.seeds.split(",")]
    cache: dict = {}
    result: dict[str, dict[int, dict]] = {}
    pool_steps = None
    for arm, spec in arms.items():
        for seed in seeds:
            d = run_dir(arm, seed, spec, args.runs_dir)
            if d is None:
                continue
            metrics = read_jsonl(d / "metrics.jsonl")
            config = load_config(d / "config.yaml", stored=True)
            steps = pool_facts(config, cache).values
            pool_steps = pool_steps or steps
            picked = {k: [steps[r["id"]] for r in read_jsonl(p)] for k, p in (
                (int(p.parent.name), p) for p in d.glob("rounds/*/selected.jsonl"))}
            result.setdefault(arm, {})[seed] = {
                "aulc": aulc([m["n_labelled"] for m in metrics], [m["accuracy"] for m in metrics]),
                "final": metrics[-1]["accuracy"], "rounds": len(metrics),
                "all": [s for k in sorted(picked) for s in picked[k]], "first": picked.get(0, []),
                "dir": d, "ties": ties(d, TIE_COLUMNS[arm], config.active_learning.query_size)
                if arm in TIE_COLUMNS else []}
    if not result:
        print("no finished runs yet", file=sys.stderr)
        return 1

    def shares(values: list[int]) -> str:
        v = np.array(values)
        return " / ".join(f"{np.mean(v == s):.2f}" for s in (1, 2, 3)) if len(v) else "-"

    print("# Screen (exploratory): AULC per arm and seed, batch composition by steps\n")
    print(f"Setting: results/arith-study/study.yaml, seeds {', '.join(map(str, seeds))}. "
          "Regenerate: `python results/screen/table.py > results/screen/screen.md`. "
          "Arms marked * are the committed study's runs.\n")
    head = " | ".join(f"seed {s}" for s in seeds)
    print(f"| arm | {head} | mean AULC | mean diff vs random (seeds) | final acc. (mean) |")
    print("|---|" + "---|" * len(seeds) + "---|---|---|")
    rand = result.get("random", {})
    for arm, runs in result.items():
        star = "*" if all(str(r["dir"]).startswith(str(STUDY_RUNS)) for r in runs.values()) else ""
        cells = " | ".join(f"{runs[s]['aulc']:.4f}" if s in runs else "-" for s in seeds)
        paired = [runs[s]["aulc"] - rand[s]["aulc"] for s in seeds if s in runs and s in rand]
        diff = f"{np.mean(paired):+.4f} ({len(paired)})" if paired else "-"
        print(f"| {arm}{star} | {cells} | {np.mean([r['aulc'] for r in runs.values()]):.4f} | "
              f"{diff} | {np.mean([r['final'] for r in runs.values()]):.3f} |")
    print("\nShare of 1- / 2- / 3-step problems among the selected items (all seeds):\n")
    print("| arm | every query | first query |")
    print("|---|---|---|")
    if pool_steps:
        print(f"| (pool) | {shares(list(pool_steps.values()))} | |")
    for arm, runs in result.items():
        print(f"| {arm} | {shares([s for r in runs.values() for s in r['all']])} | "
              f"{shares([s for r in runs.values() for s in r['first']])} |")
    print("\nThe random tie-break's part (arms that rank by one column; per query, mean over seeds):"
          " scored items tied with the query's last pick, and the share of the query drawn "
          "among them by the tie-break (0: none).\n")
    print("| arm | column | tied items, queries 1..6 | share drawn, queries 1..6 |")
    print("|---|---|---|---|")
    for arm, runs in result.items():
        per_query = list(zip(*[r["ties"] for r in runs.values() if r["ties"]]))
        if not per_query:
            continue
        tied = ", ".join(f"{np.mean([t for t, _ in q]):.0f}" for q in per_query)
        drawn = ", ".join(f"{np.mean([d for _, d in q]):.2f}" for q in per_query)
        print(f"| {arm} | `{TIE_COLUMNS[arm]}` | {tied} | {drawn} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
