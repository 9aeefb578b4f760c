"""The report's confidence and stopping pages, beside `starlora.report`'s curves.

For each (task, protocol) group, from the last round every strategy has:

* ``risk_coverage.png``: per confidence signal (`starlora.evaluation.prediction_signals`),
  the selective risk against coverage, one line per strategy, the mean over seeds of each
  run's curve (`starlora.confidence.risk_coverage`) read from ``rounds/<k>/predictions.jsonl``;
* ``reliability_signals.png``: per signal, accuracy against mean confidence in equal-mass bins
  (`starlora.confidence.adaptive_ece`) of the items of every seed pooled, one line per strategy;
* ``confidence.md``: per strategy and signal, the mean over seeds of each number of
  `starlora.confidence.signal_metrics` recomputed from the predictions (only when some run's
  predictions carry a signal beyond the answer-span probability: runs made before issue 34
  keep their report as it was);
* ``stopping.md``: with a stop set (``active_learning.stop_set``), per strategy and round the
  mean over seeds of ``stop_agreement`` and ``stop_uncertainty`` (`starlora.stopping`).

Strategies are named by their study arm labels, as in the rest of the report.
`status_lines` is what ``starlora status`` prints of one run, these signals included.
"""

from __future__ import annotations

import shlex
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from starlora.confidence import adaptive_ece, risk_coverage, signal_metrics
from starlora.evaluation import prediction_signals
from starlora.io import read_jsonl
from starlora.run.oracle import waiting
from starlora.run.store import RunPaths

RANDOM_COLOR = "#8c8c8c"  # as in the report's other plots
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]


def _signals(run_dir: Path, round_: int) -> tuple[dict[str, np.ndarray], np.ndarray] | None:
    path = RunPaths(run_dir).round_file(round_, "predictions.jsonl")
    if not path.is_file():
        return None
    rows = sorted(read_jsonl(path), key=lambda r: str(r["id"]))
    if not rows:
        return None
    return prediction_signals(rows), np.array([float(bool(r["correct"])) for r in rows])


def confidence_pages(task: str, runs: dict[str, tuple[int, list[Path]]], n_bins: int = 15
                     ) -> dict[str, bytes]:
    """The figures and table above for one group: `runs` maps each strategy to (its last
    round, its run directories). Empty when no run has predictions."""
    by: dict[str, list[tuple[dict[str, np.ndarray], np.ndarray]]] = {}
    for strategy, (round_, dirs) in sorted(runs.items()):
        found = [got for d in dirs if (got := _signals(d, round_)) is not None]
        if found:
            by[strategy] = found
    if not by:
        return {}
    names = [n for n in ("answer", "msp", "perplexity", "consistency")
             if any(n in s for runs_ in by.values() for s, _ in runs_)]
    if not names:  # predictions without any confidence (older formats, hand-made runs)
        return {}
    others = [s for s in by if s != "random"]
    colors = {"random": RANDOM_COLOR, **{s: _PALETTE[i % len(_PALETTE)]
                                         for i, s in enumerate(others)}}
    rc = Figure(figsize=(4 * len(names), 4), layout="constrained")
    rel = Figure(figsize=(4 * len(names), 4), layout="constrained")
    rc_axes = rc.subplots(1, len(names), squeeze=False)[0]
    rel_axes = rel.subplots(1, len(names), squeeze=False)[0]
    table: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    for name, ax_rc, ax_rel in zip(names, rc_axes, rel_axes):
        ax_rel.plot([0, 1], [0, 1], "--", color="black", linewidth=1)
        for strategy, found in by.items():
            have = [(s[name], y) for s, y in found if name in s]
            if not have:
                continue
            sizes = {len(y) for _, y in have}
            if len(sizes) == 1:
                risk = np.mean([risk_coverage(c, y)[1] for c, y in have], axis=0)
                ax_rc.plot(np.arange(1, len(risk) + 1) / len(risk), risk,
                           color=colors[strategy], label=strategy)
            conf = np.concatenate([c for c, _ in have])
            correct = np.concatenate([y for _, y in have])
            bins = adaptive_ece(conf, correct, n_bins)[1]
            ax_rel.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins],
                        marker="o", color=colors[strategy], label=strategy)
            numbers = [signal_metrics(c, y, n_bins) for c, y in have]
            table[strategy][name] = {k: float(np.nanmean([m[k] for m in numbers]))
                                     if not all(np.isnan(m[k]) for m in numbers) else np.nan
                                     for k in numbers[0]}
        ax_rc.set(title=f"{name}", xlabel="coverage", ylabel="selective risk (error rate)",
                  xlim=(0, 1), ylim=(0, 1))
        ax_rel.set(title=f"{name} (equal-mass bins)", xlabel="confidence", ylabel="accuracy",
                   xlim=(0, 1), ylim=(0, 1))
        ax_rc.grid(alpha=0.3)
        ax_rel.grid(alpha=0.3)
    rc_axes[0].legend(fontsize="small")
    rel_axes[0].legend(fontsize="small")
    rc.suptitle(f"{task}: risk-coverage, last round (mean over seeds)", fontsize=11)
    rel.suptitle(f"{task}: reliability per signal, last round (seeds pooled)", fontsize=11)
    out = {"risk_coverage.png": _png(rc), "reliability_signals.png": _png(rel)}
    if names != ["answer"] and names != ["answer", "msp"]:
        out["confidence.md"] = _confidence_markdown(task, table).encode()
    return out


def _confidence_markdown(task: str, table: dict[str, dict[str, dict[str, float]]]) -> str:
    keys = ["roc-auc", "rcc-auc", "sel-acc@50", "sel-acc@80", "brier", "ece", "ece-adaptive"]
    lines = [f"# {task}: confidence signals, last round", "",
             "Mean over seeds. roc-auc: AUROC for a correct answer; rcc-auc: area under the "
             "risk-coverage curve (lower is better); sel-acc@c: accuracy of the c most "
             "confident; ece: 15 equal-width bins; ece-adaptive: 15 equal-mass bins. The "
             "answer-span probability (``answer``) is about 1 for right and wrong generated "
             "answers alike: its ECE measures the error rate, not calibration.", "",
             "| strategy | signal | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for strategy, signals in table.items():
        for name, numbers in signals.items():
            cells = ["nan" if np.isnan(numbers[k]) else f"{numbers[k]:.4f}" for k in keys]
            lines.append(f"| {strategy} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def stopping_page(task: str, records: list[dict[str, Any]]) -> dict[str, bytes]:
    """``stopping.md`` from metrics.jsonl records (with ``strategy`` as shown), or nothing
    when no record has a stop-set signal."""
    if not any(r.get("stop_uncertainty") is not None for r in records):
        return {}
    cells: dict[tuple[str, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        for q in ("stop_agreement", "stop_uncertainty", "n_labelled", "accuracy"):
            if r.get(q) is not None:
                cells[(r["strategy"], r["round"])][q].append(float(r[q]))
    lines = [f"# {task}: label-free stopping signals", "",
             "Per round, mean over seeds. Agreement: of the stop set's answers with the previous "
             "round's (Cohen's kappa for choice tasks, exact-match share otherwise); uncertainty: "
             "the stop set's mean 1 - confidence. Accuracy (test set) is shown for reference; "
             "the rule never reads it.", "",
             "| strategy | round | labelled | agreement | uncertainty | accuracy |",
             "|---|---|---|---|---|---|"]
    for (strategy, round_), q in sorted(cells.items()):
        mean = {name: f"{np.mean(q[name]):.4f}" if q.get(name) else ""
                for name in ("stop_agreement", "stop_uncertainty", "accuracy")}
        lines.append(f"| {strategy} | {round_} | {np.mean(q['n_labelled']):g} | "
                     f"{mean['stop_agreement']} | {mean['stop_uncertainty']} | "
                     f"{mean['accuracy']} |")
    return {"stopping.md": ("\n".join(lines) + "\n").encode()}


def status_lines(run_dir: str | Path, status: dict[str, Any]) -> list[str]:
    """What `starlora status` prints for the run in `run_dir`, from
    `starlora.run.store.RunStore.status`: where the run is, its last evaluated round, its
    adapter, the confidence signals of that round, the stopping signals of every round, and
    the command that comes next."""
    lines = [f"run:        {run_dir}",
             f"strategy:   {status['strategy']}  seed {status['seed']}  task {status['task']}",
             f"round:      {status['round']} (rounds 0-{status['rounds'] - 1})  "
             f"phase: {status['phase']}",
             f"labelled:   {status['n_labelled']}  (pool left: {status['n_unlabelled']})"]
    if status["pending"]:
        lines.append(f"pending:    {waiting(run_dir, status['pending'], status['round'])}")
    last = status.get("last_metrics")
    if last:
        lines.append(f"last round: accuracy {last['accuracy']:.4f} on the test set  "
                     f"({last['n_labelled']} labelled, {last['seconds']:.0f} s)")
        lines.append(f"adapter:    {status['adapter']}  (peft)" if status["adapter"] else
                     "adapter:    none kept in the run directory")
        signals = last.get("signals", {})
        if signals:
            lines.append("confidence of the test answers, last round (roc-auc: higher is "
                         "better; rcc-auc, ece-adaptive: lower):")
        for name, found in signals.items():
            auc, aurc, ece = (found.get(k) for k in ("roc-auc", "rcc-auc", "ece-adaptive"))
            lines.append(f"  {name + ':':<13} roc-auc {'n/a' if auc is None else f'{auc:.3f}'}  "
                         f"rcc-auc {'n/a' if aurc is None else f'{aurc:.3f}'}  "
                         f"ece-adaptive {'n/a' if ece is None else f'{ece:.3f}'}")
    stops = [m for m in status.get("stop_signals", []) if m.get("stop_uncertainty") is not None]
    if stops:
        held = status.get("stopped_at")
        lines.append(f"stopping:   rule {status['stop_when']}"
                     + (f" (held after round {held})" if held is not None else ""))
        for m in stops:
            agree = m.get("stop_agreement")
            lines.append(f"  round {m['round']}: agreement "
                         f"{'n/a' if agree is None else f'{agree:.3f}'}  "
                         f"uncertainty {m['stop_uncertainty']:.3f}")
    if status.get("pool_used_up"):
        lines.append(f"ended:      the pool was used up in round {status['round']} "
                     "(active_learning.on_exhausted: take_rest)")
    if status["resume"]:
        lines.append(f"resume:     {status['resume']}")
    elif last:
        lines.append(f"next:       starlora report {shlex.quote(str(run_dir))}  (learning "
                     "curves and tables)")
    return lines


def _png(fig: Figure) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return buf.getvalue()
