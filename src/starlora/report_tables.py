"""The summary tables of `starlora.report`: ``summary.md`` and ``summary.csv`` of one
(task, protocol) group, from its strategies' rounds aggregated over seeds.

Each round's mean is over the seeds that reached it, so where a run is still going or lacks a
round the seed count varies by round: the tables then give it per round (``(n=1)`` in the
Markdown, ``r<k>_seeds`` in the CSV), the seeds column gives the range (``1-3``) and a note
under the Markdown table says so.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from starlora.study.stats import aulc


@dataclass
class RoundStats:
    """One strategy's round aggregated over seeds; accuracy and ECE are fractions in [0, 1]."""

    round: int
    n_labelled: float
    n: int  # seeds
    accuracy_mean: float
    accuracy_std: float
    ece_mean: float
    ece_std: float


def order(strategies: list[str]) -> list[str]:
    """`strategies` with ``random`` first, then sorted."""
    return sorted(strategies, key=lambda s: (s != "random", s))


def seeds_text(stats: Sequence[RoundStats]) -> str:
    """The number of seeds over the rounds of `stats`: ``3``, or ``1-3`` where it varies."""
    lo, hi = min(s.n for s in stats), max(s.n for s in stats)
    return str(hi) if lo == hi else f"{lo}-{hi}"


def summary_rows(strategies: dict[str, list[RoundStats]]) -> list[dict[str, Any]]:
    """Per strategy: seeds (the most any round has, and `seeds_text`), per-round stats, final
    accuracy/ECE (last round, with its seed count `final_n`) and AULC of the mean curve."""
    rows = []
    for strategy in order(list(strategies)):
        stats = strategies[strategy]
        last = stats[-1]
        rows.append(
            {
                "strategy": strategy,
                "seeds": max(s.n for s in stats),
                "seeds_text": seeds_text(stats),
                "rounds": stats,
                "final_accuracy": last.accuracy_mean,
                "final_accuracy_std": last.accuracy_std,
                "final_n": last.n,
                "final_ece": last.ece_mean,
                "aulc": aulc([s.n_labelled for s in stats], [s.accuracy_mean for s in stats]),
            }
        )
    return rows


def summary_markdown(task: str, protocol: str, rows: list[dict[str, Any]],
                     notes: Sequence[str] = ()) -> str:
    """``summary.md``: a row per strategy; `notes` (what the caller says of the runs it read)
    under the table, after the note on varying seed counts where there is one."""
    n_of: dict[int, set[float]] = {}  # each strategy's mean labelled count, by round
    for r in rows:
        for s in r["rounds"]:
            n_of.setdefault(s.round, set()).add(s.n_labelled)
    head = [
        "strategy",
        "seeds",
        *(f"r{k} (n={min(n_of[k]):g}" + (f"-{max(n_of[k]):g})" if len(n_of[k]) > 1 else ")")
          for k in sorted(n_of)),
        "final accuracy",
        "final ECE",
        "AULC",
    ]
    lines = [
        f"# {task} (protocol {protocol})",
        "",
        (
            "Accuracy is mean ± std over seeds; AULC is the area under the mean learning curve "
            "divided by the labelled range."
        ),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    varies = False
    for r in rows:
        def fewer(n: int, most: int = r["seeds"]) -> str:
            return f" (n={n})" if n != most else ""

        by_round = {s.round: f"{s.accuracy_mean:.3f} ± {s.accuracy_std:.3f}{fewer(s.n)}"
                    for s in r["rounds"]}
        varies |= any(s.n != r["seeds"] for s in r["rounds"])
        cells = [
            r["strategy"],
            r["seeds_text"],
            *(by_round.get(k, "") for k in sorted(n_of)),
            f"{r['final_accuracy']:.3f} ± {r['final_accuracy_std']:.3f}{fewer(r['final_n'])}",
            f"{r['final_ece']:.3f}",
            f"{r['aulc']:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [*(["the seed count varies by round (a run still going, or missing a round): each "
                "mean is over the seeds that reached its round, (n=...) where fewer than the "
                "strategy's most, and AULC is of that mean curve"] if varies else []), *notes]
    lines += ["", *(f"Note: {n}" for n in notes)] if notes else []
    return "\n".join(lines) + "\n"


def summary_csv(task: str, protocol: str, rows: list[dict[str, Any]]) -> str:
    """``summary.csv``: a row per strategy; per round its labelled count, seeds, accuracy mean
    and std (empty where the strategy lacks the round)."""
    rounds = sorted({s.round for r in rows for s in r["rounds"]})
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(
        [
            "task",
            "protocol",
            "strategy",
            "seeds",
            *(f"r{k}_{c}" for k in rounds
              for c in ("n_labelled", "seeds", "accuracy", "accuracy_std")),
            "final_accuracy",
            "final_accuracy_std",
            "final_ece",
            "aulc",
        ]
    )
    for r in rows:
        by_round = {s.round: s for s in r["rounds"]}
        cells: list[Any] = [task, protocol, r["strategy"], r["seeds"]]
        for k in rounds:
            s = by_round.get(k)
            cells += ([f"{s.n_labelled:g}", s.n, s.accuracy_mean, s.accuracy_std] if s
                      else [""] * 4)
        w.writerow(
            cells + [r["final_accuracy"], r["final_accuracy_std"], r["final_ece"], r["aulc"]]
        )
    return out.getvalue()
