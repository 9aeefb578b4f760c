"""The study's tables: ``study.md`` and ``study.csv`` from `starlora.study.compute_study`.

Fixed float formats (4 decimals in the markdown, 5 for p; 6 in the CSV), arms in a fixed order
(random first, then by label), comparisons by arm then baseline, diagnostics by round and
quantity: the same runs give the same bytes. Written atomically.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from starlora.io import atomic_write
from starlora.run.uncertainty import COLUMNS
from starlora.study.arms import (
    ALPHA,
    BOOTSTRAP_SEED,
    RESAMPLES,
    Comparison,
    Study,
    compute_study,
    run_labels,
)
from starlora.study.declared import REFERENCE, Declared
from starlora.study.groups import StudyRun, study_groups


def _f(x: float | None, digits: int = 4) -> str:
    """`x` with `digits` decimals ("" for None, "nan"); never "-0.000"."""
    if x is None:
        return ""
    if np.isnan(x):
        return "nan"
    return f"{round(x, digits) + 0.0:.{digits}f}"


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def _rounds_text(rounds: list[int]) -> str:
    """``Rounds 0-3 (the rounds every run has`` for consecutive rounds; else each round and
    the ones some run lacks (the caller closes the parenthesis)."""
    if rounds == list(range(rounds[0], rounds[-1] + 1)):
        return f"Rounds {rounds[0]}-{rounds[-1]} (the rounds every run has"
    gaps = sorted(set(range(rounds[0], rounds[-1])) - set(rounds))
    return (f"Rounds {', '.join(map(str, rounds))} (the rounds every run has; round(s) "
            f"{', '.join(map(str, gaps))} missing from some run")


def study_markdown(s: Study, notes: Sequence[str] = ()) -> str:
    """``study.md``: arms, primary and secondary paired comparisons, diagnostics per round.
    `notes`: what the caller says of the runs it read (unfinished runs: `starlora.run.finding
    .chosen_runs`), written under the header."""
    lines = [f"# Study: {s.task} (design {s.design})", "",
             f"{_rounds_text(s.rounds)}; labelled "
             f"{s.n_labelled[0]:g} to {s.n_labelled[1]:g}). Design: a hash of the settings "
             "every run shares (the protocol id for runs without config.yaml). AULC: trapezoid area under accuracy "
             "over the labelled count, divided by the labelled range. Mean ± sample std over "
             "seeds.", "", *(f"Note: {n}" for n in notes), *([""] if notes else []),
             "## Arms", ""]
    extra = _signal_quantities(s)
    rows = []
    for arm in s.arms.values():
        vals = [s.values[(arm.label, seed)] for seed in sorted(arm.runs)]
        cells = [_mean_std_text([v.get(q, float("nan")) for v in vals])
                 for q in ("aulc", "final_accuracy", "final_ece", *extra)]
        seeds = ",".join(str(x) for x in sorted(arm.runs))
        rows.append([arm.label, str(len(arm.runs)), seeds, *cells])
    lines += _table(["arm", "n seeds", "seeds", "AULC", "final accuracy", "final ECE¹",
                     *(EXTRA_NAMES[q] for q in extra)], rows)
    lines += [ECE_NOTE + (" " + SIGNAL_NOTE if extra else ""), ""]
    who = ("STAR arm" if s.declared is None else
           f"The pairs declared in {s.declared.citation()}: arm")
    lines += ["## Paired comparisons: AULC (primary)", "",
              f"{who} minus baseline, paired by seed. p: exact two-sided sign-flip test over "
              "all 2^n sign vectors; Holm p: Holm-Bonferroni over the comparisons in this "
              f"table{HOLM_DECLARED if s.declared else ''}; 95% CI: percentile bootstrap of the "
              f"mean difference ({RESAMPLES} resamples, NumPy seed {BOOTSTRAP_SEED}) over the "
              "resampling named." + CI_NOTE + FLOOR_NOTE
              + (TOST_NOTE if any(c.margin for c in s.comparisons) else ""), ""]
    head = ["arm", "baseline", "n seeds", "mean diff", "std", "95% CI", "p", "Holm p",
            "CI resamples"]
    primary = [c for c in s.comparisons if c.primary]
    tost = any(c.margin for c in primary)
    lines += _table(head + ["min p", "min Holm p"] + ["margin", "TOST p"] * tost,
                    [_cells(c) + [_f(c.p_floor, 5), _f(c.p_holm_floor, 5)]
                     + [f"±{c.margin:g}" if c.margin else "", _f(c.tost_p, 5)] * tost
                     for c in primary]) if primary else [
        "No STAR arm and baseline share 2 seeds (a STAR arm whose settings differ from the "
        "study's usual ones is a variant, compared only with its usual arm; `starlora report "
        "--comparisons FILE` compares the pairs a file declares: docs/study.md)."
        if s.declared is None else
        "No declared pair shares 2 seeds.", ""]
    short = [f"{c.arm} vs {c.baseline} ({len(c.diffs)} seeds)" for c in primary
             if c.p_holm_floor is not None and c.p_holm_floor >= ALPHA]
    if short:
        lines += [f"Cannot reach significance with so few seeds (even at its smallest p, the "
                  f"Holm p is not below {ALPHA:g}): " + "; ".join(short) + ".", ""]
    if s.untested:
        lines += ["Not tested" + (f" (each counts as p = 1 in Holm's family of the "
                                  f"{len(s.declared.pairs)} declared pairs)" if s.declared else "")
                  + ": " + "; ".join(s.untested) + ".", ""]
    secondary = [c for c in s.comparisons if not c.primary]
    if secondary:
        lines += ["## Paired comparisons: secondary, uncorrected", "",
                  ("Final accuracy and final ECE of the primary pairs; AULC, final accuracy "
                   "and ECE of each variant against its usual arm." if s.declared is None else
                   "Final accuracy and final ECE of the declared pairs.")
                  + (" Where runs have them, also final AURC and self-consistency AUROC "
                     "(seeds-only intervals)." if _signal_quantities(s) else ""), ""]
        lines += _table(["quantity", *head[:-2], "CI resamples"],
                        [[c.quantity, *_cells(c)[:-2], c.ci_note] for c in secondary])
    lines += _reach_markdown(s) + _stop_markdown(s) + _auroc_markdown(s)
    lines += ["## Diagnostics per round (exploratory)", "",
              "Mean ± std over the seeds that have the files; (n=...) when fewer than the "
              "arm's seeds. Round k's selection chose the labels round k+1 trains on.", ""]
    if not any(s.diagnostics.values()):
        lines += ["None recorded (no scores, selections or choice predictions).", ""]
    for arm in s.arms.values():
        per = s.diagnostics[arm.label]
        quantities = sorted({q for k in per for q in per[k]})
        if not quantities:
            continue
        rows = []
        for k in sorted(per):
            cells = [str(k)]
            for q in quantities:
                v = per[k].get(q, [])
                m, sd = _mean_std(v) if v else (None, None)
                more = f" (n={len(v)})" if v and len(v) != len(arm.runs) else ""
                cells.append(f"{_f(m, 3)} ± {_f(sd, 3)}{more}" if v else "")
            rows.append(cells)
        lines += [f"### {arm.label}", "", *_table(["round", *quantities], rows)]
    if s.notes:
        lines += ["Notes: " + "; ".join(s.notes) + ".", ""]
    return "\n".join(lines)


#: what the final ECE column measures (issue 34), under the arms table
ECE_NOTE = ("¹ Final ECE: equal-width ECE (15 bins) of the answer-span probability (the choice "
            "probability for choice tasks). For generated answers that probability is about 1 "
            "for right and wrong answers alike, so this ECE is about 1 − accuracy: it measures "
            "the error rate, not calibration.")
SIGNAL_NOTE = ("Final AURC: area under the risk-coverage curve of the sequence probability "
               "(the choice probability for choice tasks; lower is better); self-consistency "
               "AUROC: of the share of sampled answers equal to the greedy one, for a right "
               "answer (`evaluation.samples`). Secondary endpoints; runs without them show nan.")
EXTRA_NAMES = {"final_aurc": "final AURC", "final_sc_auroc": "self-consistency AUROC"}


HOLM_DECLARED = (" (its m is the number of declared pairs; a pair not tested counts as "
                 "p = 1)")
CI_NOTE = (" With few seeds the interval is too narrow: a 95% percentile bootstrap over seeds "
           "holds the true mean difference about half the time with 2 seeds, 75% with 3, 87% "
           "with 6 and 92% with 12 (simulated: docs/study.md).")
FLOOR_NOTE = (" min p: the smallest p the exact test can give with n seeds (2/2^n); min Holm "
              "p: its Holm p were every p of the family at its smallest.")
TOST_NOTE = (" TOST p (declared margins): equivalence within ±margin, the larger of two exact "
             "one-sided sign-flip p on the differences shifted by the margin; p < 0.05 says "
             "the mean difference lies within the margin (uncorrected).")


def _n(x: float) -> str:
    return "not reached" if np.isinf(x) else f"{x:.1f}"


def _reach_markdown(s: Study) -> list[str]:
    """Labels to reach random's final accuracy (declared studies only)."""
    if s.declared is None:
        return []
    lines = ["## Labels to reach random's final accuracy (secondary)", "",
             "The labelled count at which the arm's mean learning curve over the seeds it "
             "shares with `random` first reaches `random`'s final mean accuracy (linear "
             "between rounds); saved: `random`'s final count minus it. 95% CI of the count to "
             "reach: percentile "
             f"bootstrap over seeds ({RESAMPLES} resamples, NumPy seed {BOOTSTRAP_SEED}; the "
             "same seeds for both arms), with the share of resamples that reach it.", ""]
    if not s.reach:
        return lines + ["No arm shares 2 seeds with `random`.", ""]
    rows = [[r.arm, str(r.seeds), _f(r.target), _n(r.n), f"[{_n(r.ci[0])}, {_n(r.ci[1])}]",
             "" if np.isinf(r.n) else f"{r.saved:.1f}", _f(r.reached, 3)] for r in s.reach]
    return lines + _table(["arm", "n seeds", "random's final accuracy", "labelled to reach",
                           "its 95% CI", "saved", "share reached"], rows)


def _stop_markdown(s: Study) -> list[str]:
    """Where the declared stopping rule would have stopped each arm (declared stop_when only)."""
    if s.declared is None or s.declared.stop_when is None:
        return []
    source = ("the stop-set signals in `metrics.jsonl`" if s.declared.stop_on == "stop_set"
              else "the same signals computed on the test answers (`stop_on: test`: each "
              "round's answers against the previous round's; no gold answer read)")
    lines = [f"## Stopping: `{s.declared.stop_when}` (secondary)", "",
             f"Where the declared rule would have stopped each run, read after the fact from "
             f"{source} (the last round where it never fires). Means over the seeds that have "
             "the signal; accuracy lost: final minus at the stop.", ""]
    if not s.stops:
        why = ("`active_learning.stop_set` was 0" if s.declared.stop_on == "stop_set"
               else "no test predictions")
        return lines + [f"No run has the rule's signal ({why}).", ""]
    rows = [[r.arm, str(r.seeds), f"{r.stopped}/{r.seeds}", f"{r.n:.1f}", _f(r.accuracy, 3),
             _f(r.final_accuracy, 3), f"{r.saved:.1f}", _f(r.lost, 3)] for r in s.stops]
    return lines + _table(["arm", "n seeds", "stopped early", "labelled at stop",
                           "accuracy at stop", "final accuracy", "labels saved",
                           "accuracy lost"], rows)


def _signal_quantities(s: Study) -> list[str]:
    """The `SIGNAL_ENDPOINTS` some run of the study has (none for runs before issue 34)."""
    return [q for q in EXTRA_NAMES if any(q in v for v in s.values.values())]


def _mean_std_text(values: list[float]) -> str:
    v = _finite(values)
    if not v:
        return "nan"
    m, sd = _mean_std(v)
    return f"{_f(m)} ± {_f(sd)}" + (f" (n={len(v)})" if len(v) != len(values) else "")


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if not np.isnan(v)]


def _auroc_markdown(s: Study) -> list[str]:
    final = s.rounds[-1]
    lines = ["## Uncertainty as a predictor of a wrong test answer (secondary)", "",
             f"AUROC, after round {final}, of each uncertainty for predicting a wrong test "
             "answer (wrong is the positive class; ties count 1/2; 0.5 is chance): PE and ME "
             "of the gold answer and of the adapted model's own greedy answer, from one "
             "deterministic pass and from the mean over the MC-dropout passes "
             "(`scoring.mc_passes`, 3 when that is 1), as `starlora uncertainty` writes them "
             f"to `rounds/{final}/test_uncertainty.jsonl`. Mean ± sample std over the runs "
             "that have the file; (n=...) where fewer runs have a value (no AUROC when every "
             "answer is right, or every one wrong).", ""]
    total = sum(len(a.runs) for a in s.arms.values())
    have = sum(len(v) for v in s.auroc.values())
    rows = []
    for arm in s.arms.values():
        runs = s.auroc.get(arm.label, [])
        for measure in ("pe", "me") if runs else ():
            cells = [arm.label, measure.upper(), str(len(runs))]
            for answers in ("gold", "own"):
                for passes in ("1", "mc"):
                    v = _finite([r[f"{measure}_{answers}_{passes}"] for r in runs])
                    if not v:
                        cells.append("nan")
                        continue
                    m, sd = _mean_std(v)
                    more = f" (n={len(v)})" if len(v) != len(runs) else ""
                    cells.append(f"{_f(m)} ± {_f(sd)}{more}")
            rows.append(cells)
    if rows:
        lines += _table(["arm", "measure", "runs", "gold, 1 pass", "gold, MC mean",
                         "own, 1 pass", "own, MC mean"], rows)
    missing = total - have
    where = f"`rounds/{final}/test_uncertainty.jsonl`"
    if not have:
        lines += [f"No run has {where} yet (`starlora uncertainty RUN_DIR` writes it).", ""]
    elif missing:
        lines += [f"Left out (no {where}; `starlora uncertainty RUN_DIR` writes it): "
                  f"{missing} of {total} runs.", ""]
    else:
        lines += [f"All {total} runs have the file.", ""]
    return lines


def _cells(c: Comparison) -> list[str]:
    m, sd = _mean_std(c.diffs)
    return [c.arm, c.baseline, str(len(c.diffs)), _f(m), _f(sd),
            f"[{_f(c.ci[0])}, {_f(c.ci[1])}]", _f(c.p, 5), _f(c.p_holm, 5), c.ci_note]


CSV_HEAD = ["section", "task", "design", "arm", "baseline", "round", "quantity", "n", "estimate",
            "std", "ci_low", "ci_high", "p", "p_holm", "note"]


def study_csv(s: Study) -> str:
    """``study.csv``: one long table (`CSV_HEAD`); section is arms, paired, auroc or
    diagnostics."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_HEAD)

    def row(section: str, arm: str, baseline: str, round_: str, quantity: str, n: int,
            mean: float, sd: float, ci=("", ""), p="", p_holm="", note="") -> None:
        w.writerow([section, s.task, s.design, arm, baseline, round_, quantity, n, _f(mean, 6),
                    _f(sd, 6), *ci, p, p_holm, note])

    for arm in s.arms.values():
        for q in ("aulc", "final_accuracy", "final_ece", *_signal_quantities(s)):
            vals = _finite([s.values[(arm.label, seed)].get(q, float("nan"))
                            for seed in sorted(arm.runs)])
            row("arms", arm.label, "", "", q, len(vals),
                *(_mean_std(vals) if vals else (float("nan"), float("nan"))))
    for c in s.comparisons:
        kind = "primary" if c.primary else "secondary"
        row("paired", c.arm, c.baseline, "", c.quantity, len(c.diffs), *_mean_std(c.diffs),
            (_f(c.ci[0], 6), _f(c.ci[1], 6)), _f(c.p, 6), _f(c.p_holm, 6),
            f"{kind}; ci {c.ci_note}")
    for c in s.comparisons:
        if c.margin:
            row("tost", c.arm, c.baseline, "", c.quantity, len(c.diffs), *_mean_std(c.diffs),
                p=_f(c.tost_p, 6), note=f"equivalence within ±{c.margin:g}")
    for r in s.reach:
        row("reach", r.arm, REFERENCE, str(s.rounds[-1]), "n_labelled_to_reach", r.seeds,
            r.n, float("nan"), (_f(r.ci[0], 6), _f(r.ci[1], 6)),
            note=f"target {_f(r.target, 6)}; saved {_f(r.saved, 6)}; reached {_f(r.reached, 6)}")
    for r in s.stops:
        row("stop", r.arm, "", "", "n_labelled_at_stop", r.seeds, r.n, float("nan"),
            note=f"rule {s.declared.stop_when}; stopped early {r.stopped}; accuracy at stop "
                 f"{_f(r.accuracy, 6)}; final {_f(r.final_accuracy, 6)}; saved {_f(r.saved, 6)}")
    for arm in s.arms.values():
        runs = s.auroc.get(arm.label, [])
        missing = len(arm.runs) - len(runs)
        note = f"{missing} of {len(arm.runs)} runs without the file" if missing else ""
        for q in COLUMNS if runs else ():
            v = _finite([r[q] for r in runs])
            mean, sd = _mean_std(v) if v else (float("nan"), float("nan"))
            row("auroc", arm.label, "", str(s.rounds[-1]), q, len(v), mean, sd, note=note)
    for arm in s.arms.values():
        per = s.diagnostics[arm.label]
        for k in sorted(per):
            for q in sorted(per[k]):
                row("diagnostics", arm.label, "", str(k), q, len(per[k][q]),
                    *_mean_std(per[k][q]))
    return out.getvalue()


def study_files(records: list[dict[str, Any]],
                groups: dict[tuple[str, str], list[StudyRun]] | None = None,
                declared: Declared | None = None, notes: Sequence[str] = ()) -> dict[str, bytes]:
    """``study.md`` and ``study.csv`` for each group that has a study (prefixed by task and
    design when there are several), by file name, computed and checked but not written:
    bad input (a declared arm no group has, an arm with a seed twice) raises here. `groups`:
    ``study_groups(records)`` when the caller already has it; `declared`: the primary family
    (`starlora.study.declared`); `notes`: written under each ``study.md``'s header."""
    if groups is None:
        groups = study_groups(records)
    if declared is not None:
        declared.check_used(set(run_labels(groups).values()))
    studies = [s for (task, design), runs in groups.items()
               if (s := compute_study(task, design, runs, declared)) is not None]
    files = {}
    for s in studies:
        prefix = ""
        if len(studies) > 1:
            prefix = re.sub(r"[^A-Za-z0-9.+-]+", "-", f"{s.task}-{s.design}").strip("-") + "_"
        files[prefix + "study.md"] = study_markdown(s, notes).encode()
        files[prefix + "study.csv"] = study_csv(s).encode()
    return files


def write_studies(records: list[dict[str, Any]], out_dir: Path,
                  groups: dict[tuple[str, str], list[StudyRun]] | None = None,
                  declared: Declared | None = None) -> dict[str, Path]:
    """Write `study_files` into `out_dir` (which exists); returns the written paths by file
    name. Everything is computed and checked before the first file is written."""
    return {name: atomic_write(out_dir / name, data)
            for name, data in study_files(records, groups, declared).items()}
