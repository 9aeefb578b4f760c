"""Apply PROTOCOL.md's rule that sets the default strategy, to both settings' reports.

    starlora report results/study-2/runs/smollm2 --comparisons results/study-2/comparisons.yaml \
        --out results/study-2/report/smollm2          # and the same for calendar, then:
    python results/study-2/default_rule.py results/study-2/report/smollm2/study.csv \
        results/study-2/report/calendar/study.csv

The rule ("The rule that sets the default"), applied once all 96 runs are finished:

1. an arm qualifies if, in **both** settings, it beats `random` (Holm-adjusted p < 0.05
   and the bootstrap interval above 0) and is not worse than `pe` (its TOST within the
   declared margin concludes equivalence, p < 0.05, or it beats `pe` as above);
2. of the qualifying arms, the default is the one with the higher mean AULC over the settings;
3. if none qualifies, the default is `pe` on the model's own answers.

The candidate arms and their margins are the ones ``comparisons.yaml`` declares (each arm
compared with `random` and with `pe`); the numbers are the report's ``study.csv`` rows
(``paired`` and ``tost`` for AULC, ``arms`` for each arm's mean AULC). Prints one line per arm
and setting, then the verdict; exits 1 if a row the rule needs is missing, or if the reports
are not the whole study (`incomplete`: both tasks, 12 seeds, every round).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ALPHA = 0.05
FALLBACK = "pe"
#: what PROTOCOL.md fixes and the rule needs whole: the two settings' tasks, 12 paired seeds,
#: and rounds 0-6 (16-112 labels) in every run
TASKS = ("arith", "calendar")
SEEDS = 12
LAST_ROUND = 6


def candidates(comparisons: Path) -> list[str]:
    """The arms ``comparisons.yaml`` compares with `random` and `pe`, in declared order (read
    as the report reads it, `starlora.study.declared.load_declared`)."""
    from starlora.study.declared import load_declared

    return list(dict.fromkeys(p.arm for p in load_declared(comparisons).pairs))


def row(rows: list[dict[str, str]], section: str, arm: str, baseline: str = "") -> dict:
    """The AULC row of `section` for `arm` (against `baseline`); KeyError naming it if absent."""
    for r in rows:
        if (r["section"], r["arm"], r["baseline"], r["quantity"]) == (section, arm, baseline,
                                                                       "aulc"):
            return r
    raise KeyError(f"no {section} AULC row for {arm!r}" + (f" against {baseline!r}" if baseline
                                                            else ""))


def beats(r: dict[str, str]) -> bool:
    """A paired AULC row: Holm-adjusted p below ALPHA and the interval above 0."""
    return float(r["p_holm"]) < ALPHA and float(r["ci_low"]) > 0


def judge(rows: list[dict[str, str]], arm: str) -> dict[str, object]:
    """One setting's verdict for `arm`: beats random, equivalent to pe, beats pe, qualifies,
    and its mean AULC."""
    v: dict[str, object] = {
        "beats_random": beats(row(rows, "paired", arm, "random")),
        "equivalent_to_pe": float(row(rows, "tost", arm, "pe")["p"]) < ALPHA,
        "beats_pe": beats(row(rows, "paired", arm, "pe")),
        "aulc": float(row(rows, "arms", arm)["estimate"]),
    }
    v["qualifies"] = v["beats_random"] and (v["equivalent_to_pe"] or v["beats_pe"])
    return v


def incomplete(reports: dict[str, list[dict[str, str]]], arms: list[str]) -> list[str]:
    """What makes `reports` other than the protocol's analysis (empty when none): not the two
    settings' tasks (`TASKS`), a row the rule reads on fewer than `SEEDS` seeds, an interval
    that did not resample test items, or an analysis cut short of round `LAST_ROUND` (the
    report's AULC covers the rounds every run has). The report computes what the runs allow;
    the rule is applied only to the whole study."""
    problems = []
    tasks = sorted({r["task"] for rows in reports.values() for r in rows})
    if len(reports) != len(TASKS) or tasks != sorted(TASKS):
        problems.append(f"the rule needs one report of each task {', '.join(TASKS)}; got "
                        f"{len(reports)} report(s) of {', '.join(tasks) or 'no task'}")
    for name, rows in reports.items():
        for r in rows:
            used = r["arm"] in arms and r["quantity"] == "aulc" and (
                r["section"] == "arms" or r["baseline"] in ("random", "pe")
                and r["section"] in ("paired", "tost"))
            if used and r["n"] != str(SEEDS):
                problems.append(f"{name}: {r['section']} AULC of {r['arm']}"
                                f"{' against ' + r['baseline'] if r['baseline'] else ''} "
                                f"on {r['n']} seeds, not {SEEDS}")
            if used and r["section"] == "paired" and "seeds x items" not in r["note"]:
                problems.append(f"{name}: the interval of {r['arm']} against {r['baseline']} "
                                f"did not resample test items ({r['note']})")
        last = {r["round"] for r in rows if r["section"] == "reach"}
        if last != {str(LAST_ROUND)}:
            problems.append(f"{name}: the analysis ends at round {', '.join(sorted(last)) or '?'}"
                            f", not {LAST_ROUND} (a run without every round?)")
    return problems


def default(reports: dict[str, list[dict[str, str]]], arms: list[str]) -> tuple[str, list[str]]:
    """The default strategy's arm label by the rule, and the lines that show why."""
    lines, qualified = [], {}
    for arm in arms:
        verdicts = {name: judge(rows, arm) for name, rows in reports.items()}
        for name, v in verdicts.items():
            lines.append(f"{arm} in {name}: beats random {v['beats_random']}, equivalent to pe "
                         f"{v['equivalent_to_pe']}, beats pe {v['beats_pe']}, mean AULC "
                         f"{v['aulc']:.4f} -> {'qualifies' if v['qualifies'] else 'does not'}")
        if all(v["qualifies"] for v in verdicts.values()):
            qualified[arm] = sum(v["aulc"] for v in verdicts.values()) / len(verdicts)
    if not qualified:
        lines.append(f"no arm qualifies in every setting: the default is {FALLBACK} (rule 3)")
        return FALLBACK, lines
    pick = max(qualified, key=qualified.__getitem__)
    lines.append("qualifying (mean AULC over the settings): " + ", ".join(
        f"{a} {m:.4f}" for a, m in qualified.items()) + f"; the default is {pick} (rule 2)")
    return pick, lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("reports", nargs="+", type=Path, help="each setting's report study.csv")
    ap.add_argument("--comparisons", type=Path, default=HERE / "comparisons.yaml")
    args = ap.parse_args()
    names = [p.parent.name for p in args.reports]  # the setting: report/<setting>/study.csv
    if len(set(names)) < len(names):
        names = [str(p) for p in args.reports]
    reports = {}
    for name, path in zip(names, args.reports):
        with path.open(newline="") as f:
            reports[name] = list(csv.DictReader(f))
    arms = candidates(args.comparisons)
    problems = incomplete(reports, arms)
    if problems:
        print("error: not the protocol's analysis:\n  " + "\n  ".join(problems),
              file=sys.stderr)
        return 1
    try:
        pick, lines = default(reports, arms)
    except KeyError as e:
        print(f"error: {e.args[0]} in one of {', '.join(map(str, args.reports))}",
              file=sys.stderr)
        return 1
    print("\n".join(lines))
    print(f"default: {pick}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
