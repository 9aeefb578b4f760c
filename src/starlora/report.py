"""Reports: learning curves, calibration and a summary table from runs' evaluated rounds.

`build_report` reads each run directory's ``metrics.jsonl`` (a line per evaluated round), groups
rounds by (task, protocol), then by strategy, aggregates seeds per round and writes, per group:

* ``accuracy.png`` and ``ece.png``: mean over seeds against the labelled count, one line per
  strategy with a band of mean ± std (``random`` always grey);
* ``reliability.png``: one panel per strategy for its last round, bins pooled over seeds from
  ``rounds/<k>/metrics.json``;
* ``summary.md`` and ``summary.csv``: accuracy per round, final accuracy and the normalised
  area under the learning curve (`aulc`);
* ``risk_coverage.png``, ``reliability_signals.png``, and where the runs have them
  ``confidence.md`` and ``stopping.md`` (`starlora.report_confidence`).

In these files (plots, and the ``strategy`` column of the summaries) a strategy is named by
its study arm label (`starlora.study.run_labels`), e.g. ``pe-dynamic [answers=gold]`` when
other runs of the report score the model's own answers.

Runs of different tasks or protocols are never averaged together; with more than one group,
file names are prefixed by the group. Seed spread is the sample standard deviation (ddof=1;
0 for a single seed).

It also writes ``study.md`` and ``study.csv`` (`starlora.study`) where runs of one task form
at least two arms that share at least two seeds: arms labelled from their configs (so runs
that differ in, say, ``scoring.answers`` are never merged), per-seed AULC, final accuracy and
ECE; each STAR arm (``*-dynamic``, ``*-subtract``) against ``random`` and against ``pe``/``me``
with the same ``scoring.answers``: the mean paired difference over common seeds, the exact
two-sided sign-flip p (all 2^n sign vectors), Holm-Bonferroni over the AULC comparisons, and
a 95% percentile bootstrap interval (2000 resamples, fixed seed) resampling seeds and test
items; final accuracy and ECE differences as uncorrected secondary results; and exploratory
per-round diagnostics (`starlora.study.diagnostics`). The study groups by task and design
settings, not by protocol id, so an arm with different scoring settings is still compared.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure  # a bare Figure renders with Agg: no display, no pyplot

from starlora.errors import DataError
from starlora.evaluation import ece_from_bins
from starlora.io import atomic_write, make_folder, read_records
from starlora.report_confidence import confidence_pages, stopping_page
from starlora.report_tables import (
    RoundStats,
    seeds_text,
    summary_csv,
    summary_markdown,
    summary_rows,
)
from starlora.report_tables import order as _order
from starlora.run.finding import find_runs
from starlora.run.store import RunPaths
from starlora.study.arms import run_labels
from starlora.study.declared import load_declared
from starlora.study.groups import study_groups
from starlora.study.report import study_files
from starlora.study.stats import aulc  # noqa: F401 (callers import it from here)

RANDOM_COLOR = "#8c8c8c"
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
_NUMBER = (int, float)
_FIELDS: dict[str, tuple[type, ...]] = {  # required fields of a metrics.jsonl line
    "round": (int,), "n_labelled": _NUMBER, "accuracy": _NUMBER, "ece": (*_NUMBER, type(None)),
    "strategy": (str,), "seed": (int,), "task": (str,), "protocol": (str,),
}  # fmt: skip


def load_runs(run_dirs: list[str | Path]) -> list[dict[str, Any]]:
    """Every round record of every run, each with its ``run_dir`` added; a folder that is not
    a run directory stands for the runs below it (`starlora.run.finding.find_runs`).

    A round logged twice (a resumed run) keeps its last line. Raises DataError naming the file
    and line for a missing file, malformed JSON, or a missing or mistyped field, and when two
    run directories hold the same (task, protocol, strategy, seed)."""
    records: list[dict[str, Any]] = []
    owner: dict[tuple, Path] = {}
    for run_dir in find_runs(run_dirs):
        path = RunPaths(run_dir).metrics
        if not path.is_file():
            raise DataError(str(path), None, None, "no such file (not a run directory, or "
                            "no round evaluated yet)")
        rounds: dict[tuple, dict[str, Any]] = {}
        for lineno, rec in read_records(path):
            for name, types in _FIELDS.items():
                if name not in rec:
                    raise DataError(str(path), lineno, name, "missing")
                if not isinstance(rec[name], types) or isinstance(rec[name], bool):
                    raise DataError(str(path), lineno, name, f"wrong type: {rec[name]!r}")
            key = (rec["task"], rec["protocol"], rec["strategy"], rec["seed"])
            if owner.setdefault(key, run_dir) != run_dir:
                raise DataError(
                    str(path),
                    lineno,
                    None,
                    f"same task/protocol/strategy/seed as {owner[key]}; pass only one of them",
                )
            ece = math.nan if rec["ece"] is None else rec["ece"]
            rounds[(*key, rec["round"])] = {**rec, "ece": ece, "run_dir": run_dir}
        if not rounds:
            raise DataError(str(path), None, None, "no rounds")
        records.extend(rounds.values())
    return records


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def aggregate(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, list[RoundStats]]]:
    """``{(task, protocol): {strategy: [RoundStats per round, by round]}}``."""
    by: dict[tuple, dict[str, dict[int, list]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for rec in records:
        by[(rec["task"], rec["protocol"])][rec["strategy"]][rec["round"]].append(rec)
    out: dict[tuple[str, str], dict[str, list[RoundStats]]] = {}
    for group, strategies in sorted(by.items()):
        out[group] = {}
        for strategy, rounds in sorted(strategies.items()):
            stats = []
            for k, recs in sorted(rounds.items()):
                acc, ece = [r["accuracy"] for r in recs], [r["ece"] for r in recs]
                n_lab = float(np.mean([r["n_labelled"] for r in recs]))
                stats.append(RoundStats(k, n_lab, len(recs), *_mean_std(acc), *_mean_std(ece)))
            out[group][strategy] = stats
    return out


def pooled_bins(run_dirs: list[Path], round_: int) -> list[dict[str, float]]:
    """Calibration bins of `round_` pooled over runs: counts summed, confidence and accuracy
    count-weighted. Runs without ``rounds/<round_>/metrics.json`` are skipped."""
    pooled: dict[tuple[float, float], list[float]] = {}
    for run_dir in run_dirs:
        path = RunPaths(run_dir).round_file(round_, "metrics.json")
        if not path.is_file():
            continue
        try:
            bins = json.loads(path.read_text(encoding="utf-8"))["bins"]
            for b in bins:
                acc = pooled.setdefault((b["lower"], b["upper"]), [0.0, 0.0, 0.0])
                if b["count"]:  # an empty bin has no confidence or accuracy (None)
                    acc[0] += b["count"]
                    acc[1] += b["count"] * b["confidence"]
                    acc[2] += b["count"] * b["accuracy"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(str(path), None, "bins", f"malformed ({e!r})") from None
    return [
        {
            "lower": lo,
            "upper": hi,
            "count": c,
            "confidence": sc / c if c else math.nan,
            "accuracy": sa / c if c else math.nan,
        }
        for (lo, hi), (c, sc, sa) in sorted(pooled.items())
    ]


def _colors(strategies: list[str]) -> dict[str, str]:
    others = [s for s in strategies if s != "random"]
    return {
        "random": RANDOM_COLOR,
        **{s: _PALETTE[i % len(_PALETTE)] for i, s in enumerate(others)},
    }


def _wrapped(label: str, suffix: str = "") -> str:
    """`label` + `suffix` for a plot, with an arm's settings (``[...]``) on a line of their own."""
    head, sep, rest = label.partition(" [")
    return f"{head}{suffix}\n[{rest}" if sep else f"{label}{suffix}"


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return buf.getvalue()


def _curve_plot(
    task: str, protocol: str, strategies: dict[str, list[RoundStats]], metric: str, label: str
) -> Figure:
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    colors = _colors(list(strategies))
    for strategy in _order(list(strategies)):
        stats = strategies[strategy]
        x = [s.n_labelled for s in stats]
        mean = np.array([getattr(s, f"{metric}_mean") for s in stats])
        std = np.array([getattr(s, f"{metric}_std") for s in stats])
        seeds = seeds_text(stats)  # "3", or "1-3" where later rounds have fewer
        color = colors[strategy]
        ax.plot(
            x, mean, marker="o", color=color,
            label=_wrapped(strategy, f" ({seeds} seed{'s' * (seeds != '1')})"),
        )
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
    ax.set_xlabel("labelled examples")
    ax.set_ylabel(label)
    ax.set_title(f"{task}: {label} vs labelled examples\nprotocol {protocol}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def _reliability_plot(task: str, panels: dict[str, tuple[int, list[dict[str, float]]]]) -> Figure:
    fig = Figure(figsize=(4 * len(panels), 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    colors = _colors(list(panels))
    for ax, strategy in zip(axes, _order(list(panels))):
        round_, bins = panels[strategy]
        ax.plot([0, 1], [0, 1], "--", color="black", linewidth=1, label="perfect calibration")
        total = sum(b["count"] for b in bins)
        for b in bins:
            if not b["count"]:
                continue
            mid, width = (b["lower"] + b["upper"]) / 2, b["upper"] - b["lower"]
            ax.bar(
                mid,
                b["accuracy"],
                width=width,
                color=colors[strategy],
                alpha=0.8,
                edgecolor="black",
                linewidth=0.5,
            )
            ax.text(
                mid, b["accuracy"] + 0.01, f"{b['count']:g}", ha="center", va="bottom", fontsize=7
            )
        note = f"ECE {ece_from_bins(bins):.3f}, n={total:g}" if total else "no bins recorded"
        ax.set_title(f"{_wrapped(strategy, f', round {round_}')}\n{note}", fontsize=10)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.08)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
    fig.suptitle(f"{task}: reliability, last round (bins pooled over seeds)", fontsize=11)
    return fig


def _prefix(task: str, protocol: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9.-]+", "-", f"{task}-{protocol}").strip("-")
    if len(slug) > 48:
        slug = f"{task[:32]}-{hashlib.sha1(protocol.encode()).hexdigest()[:8]}"
    return slug + "_"


def build_report(run_dirs: list[str | Path], out_dir: str | Path,
                 comparisons: str | Path | None = None,
                 notes: Sequence[str] = ()) -> dict[str, Path]:
    """Write curves, reliability diagrams and summary tables for `run_dirs` into `out_dir`.

    `comparisons`: a file declaring the study's primary comparisons (`starlora.study.declared`);
    without it, the first study's family. `notes`: what the caller says of the runs it chose
    (unfinished runs, runs without a round: `starlora.run.finding.chosen_runs`), written into
    every ``summary.md`` and ``study.md``. Returns the written paths by file name
    (``"accuracy.png"``, ``"summary.md"``, ``"study.md"``...; with several (task, protocol)
    groups the names carry the group prefix). Every file is made in memory first, so bad input
    raises before `out_dir` is made or anything is written.
    """
    declared = None if comparisons is None else load_declared(comparisons)
    records = load_runs(run_dirs)
    # curves and summaries name each line by its study arm label, so that runs that differ
    # in settings (e.g. scoring.answers) are told apart across the per-protocol files
    study = study_groups(records)
    labels = run_labels(study)
    if declared is not None:
        declared.check_used(set(labels.values()))
    shown = [{**r, "strategy": labels.get(r["run_dir"], r["strategy"])} for r in records]
    groups = aggregate(shown)
    files: dict[str, bytes] = {}
    for (task, protocol), strategies in groups.items():
        prefix = _prefix(task, protocol) if len(groups) > 1 else ""
        panels, last_dirs = {}, {}
        for strategy, stats in strategies.items():
            last = stats[-1].round
            key = (task, protocol, strategy, last)
            dirs = [
                r["run_dir"]
                for r in shown
                if (r["task"], r["protocol"], r["strategy"], r["round"]) == key
            ]
            panels[strategy] = (last, pooled_bins(dirs, last))
            last_dirs[strategy] = (last, dirs)
        rows = summary_rows(strategies)
        group = {
            "accuracy.png": _png(_curve_plot(task, protocol, strategies, "accuracy", "accuracy")),
            "ece.png": _png(_curve_plot(task, protocol, strategies, "ece", "ECE")),
            "reliability.png": _png(_reliability_plot(task, panels)),
            "summary.md": summary_markdown(task, protocol, rows, notes).encode(),
            "summary.csv": summary_csv(task, protocol, rows).encode(),
            **confidence_pages(task, last_dirs),
            **stopping_page(task, [r for r in shown
                                   if (r["task"], r["protocol"]) == (task, protocol)]),
        }
        files.update((prefix + name, data) for name, data in group.items())
    files.update(study_files(records, study, declared, notes))
    out_dir = make_folder(out_dir)
    return {name: atomic_write(out_dir / name, data) for name, data in files.items()}
