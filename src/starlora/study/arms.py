"""The study: paired per-seed statistics of active-learning arms, computed by `starlora report`.

**Groups.** Runs of one task are compared when their configs agree on every *design* setting:
everything except the seed, the method settings (``active_learning.strategy``, ``scoring.*``,
``lora.*``, ``training.*``, the λ schedule, ``active_learning.normalize``,
``active_learning.diversity`` and ``diversity_pool``) and the
result-neutral, extendable and stopping ones (`starlora.run.protocol`; settings added later
count only away from the value runs had before them, `identity`). So a study spans protocol ids:
``scoring.answers=gold`` changes the protocol id but not the experiment it is an arm of. A run
without a readable ``config.yaml`` forms groups by its protocol id. Runs whose
``identity.json`` recorded another precision or other pool, test or labelled data than the
rest of their design form a study of their own (`starlora.study.groups`).

**Arms.** Runs with the same strategy and the same values of the config keys that differ
within the group (seed, result-neutral and extendable keys excluded) form one arm, labelled by
the strategy and each such key whose value is not the group's most common one (ties: the
default value, then the smallest), e.g. ``pe-dynamic [answers=gold]``,
``pe-dynamic [b_decay_mode=none, dropout=0.0, mc_passes=1]``. A key is named by its last part
unless two differing keys share it; the parts are sorted.

**Rounds.** Only the rounds every run of the group has are used (a run still going truncates
the study); "final" is the last of them.

**Per seed.** AULC (`starlora.study.stats.aulc`) over those rounds from ``metrics.jsonl``;
final accuracy and final ECE.

**Variants.** An arm whose label names a setting other than ``scoring.answers`` (e.g. the
constraint ablation ``b_decay_mode=none, dropout=0.0, mc_passes=1``) is a variant: it is not in
the primary family; it is compared, as a secondary result, with the arm of the same strategy and
answers that has the group's usual settings (AULC, final accuracy and ECE, uncorrected).

**Declared comparisons.** With a comparisons file (`starlora.study.declared`), the primary
family is the declared pairs instead of the default below, with a TOST p where a margin is
declared; Holm runs over every declared pair (its m is their number), a pair this group could
not test (an arm missing, fewer than 2 shared seeds, over 30 seeds) counting as p = 1; and the labels-to-reach table (and, with a declared ``stop_when``, the stop
points) are added.

**Paired comparisons.** By default, each STAR arm (strategy ``*-dynamic`` or ``*-subtract``, not a
variant) against each baseline arm (not a variant): ``random``, and ``pe``/``me`` with the same
``scoring.answers``; the difference is STAR minus baseline over the seeds both arms have (at
least 2). Primary: AULC, with the exact
two-sided sign-flip test (`starlora.study.stats.sign_flip_p`: all 2^n sign vectors; p is the
share whose |sum| reaches the observed |sum| less 1e-9 * max(1, sum |d|); up to 30 seeds) and
Holm-Bonferroni correction over all primary comparisons of the group. Where runs recorded
confidence signals (issue 34), two more secondary endpoints (`SIGNAL_ENDPOINTS`): the final
AURC of the sequence probability and the final AUROC of the self-consistency confidence. The 95% interval is the percentile bootstrap (2000 resamples, NumPy seed 0) of the mean
difference, resampling seeds and test items (per-item correctness from
``rounds/<k>/predictions.jsonl``, AULC recomputed on the resampled items); it falls back to
seeds only, and says why, when predictions are missing, hold other items, or disagree with
``metrics.jsonl``. Secondary (uncorrected): final accuracy (same bootstrap) and final ECE
(seeds only). Diagnostics per round: `starlora.study.diagnostics`.

**Uncertainty as a predictor of a wrong answer** (secondary): per run, the AUROC of each column
of ``rounds/<final>/test_uncertainty.jsonl`` (`starlora.run.uncertainty`: PE and ME, gold and
own answers, one pass and the MC mean) for a wrong test answer (`starlora.study.stats.auroc`);
per arm, over the runs that have the file.

Output: ``study.md`` and ``study.csv``, only for a group with at least 2 arms of which 2 share
at least 2 seeds. Numbers have fixed formats and every order is sorted: the same runs give the
same bytes.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from starlora.config import ExperimentConfig, flatten_config
from starlora.errors import DataError
from starlora.run.identity import machine_moves
from starlora.run.store import RunPaths
from starlora.study.declared import Declared, ReachRow, StopRow, reach_rows, stop_rows
from starlora.study.diagnostics import run_auroc, run_diagnostics
from starlora.study.groups import NOT_ARM, StudyRun
from starlora.study.items import ItemCorrectness
from starlora.study.stats import (
    MAX_EXACT,
    aulc,
    bootstrap_diff_ci,
    holm,
    min_sign_flip_p,
    sign_flip_p,
    tost_p,
)

RESAMPLES = 2000
BOOTSTRAP_SEED = 0
#: the significance level of the notes on what a comparison can reach
ALPHA = 0.05


@dataclass
class Arm:
    label: str
    strategy: str
    answers: str | None
    variant: bool = False  # differs from the group's usual settings beyond scoring.answers
    runs: dict[int, StudyRun] = field(default_factory=dict)  # by seed


@dataclass
class Comparison:
    arm: str
    baseline: str
    quantity: str  # "aulc" (primary), "final_accuracy", "final_ece", SIGNAL_ENDPOINTS (secondary)
    diffs: list[float]
    p: float
    ci: tuple[float, float]
    ci_note: str
    p_holm: float | None = None
    primary: bool = True  # AULC of a STAR arm against a baseline; False: a variant's comparison
    margin: float | None = None  # a declared equivalence margin (AULC), with its TOST p
    tost_p: float | None = None
    p_floor: float | None = None  # the smallest p the test can give with len(diffs) seeds
    p_holm_floor: float | None = None  # Holm's p if every primary p were at its floor


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def label_arms(entries: list[tuple[str, dict[str, Any] | None]]) -> list[str]:
    """An arm label for each (strategy, flat config or None) of one group (see module doc)."""
    return [label for label, _ in _labels_and_keys(entries)]


def run_labels(groups: dict[tuple[str, str], list[StudyRun]]) -> dict[Path, str]:
    """The arm label of each run directory of `groups` (`study_groups`), as its study group
    labels it: e.g. ``pe-dynamic [answers=gold]`` beside runs on the model's own answers; the
    plain strategy where nothing else differs."""
    out = {}
    for runs in groups.values():
        for run, label in zip(runs, label_arms([(r.strategy, r.flat) for r in runs])):
            out[run.run_dir] = label
    return out


def _labels_and_keys(entries: list[tuple[str, dict[str, Any] | None]]
                     ) -> list[tuple[str, list[str]]]:
    """(label, the config keys named in it) for each entry of `label_arms`."""
    flats = [f for _, f in entries if f is not None]
    keys = sorted({k for f in flats for k in f} - NOT_ARM)
    varying = [k for k in keys if len({_text(f.get(k)) for f in flats}) > 1]
    defaults = flatten_config(ExperimentConfig())
    reference = {}
    for k in varying:
        counts = Counter(_text(f.get(k)) for f in flats)
        default = _text(defaults.get(k))
        reference[k] = min(counts, key=lambda v: (-counts[v], v != default, v))
    short = [k.rsplit(".", 1)[-1] for k in varying]
    names = {k: s if short.count(s) == 1 else k for k, s in zip(varying, short)}
    labels = []
    for strategy, flat in entries:
        named = [] if flat is None else [k for k in varying
                                         if _text(flat.get(k)) != reference[k]]
        parts = sorted(f"{names[k]}={_text(flat.get(k))}" for k in named)
        labels.append((f"{strategy} [{', '.join(parts)}]" if parts else strategy, named))
    return labels


def _arms(runs: list[StudyRun]) -> dict[str, Arm]:
    labels = _labels_and_keys([(r.strategy, r.flat) for r in runs])
    arms: dict[str, Arm] = {}
    for run, (label, named) in zip(runs, labels):
        answers = None if run.config is None else run.config.scoring.answers
        variant = any(k != "scoring.answers" for k in named)
        arm = arms.setdefault(label, Arm(label, run.strategy, answers, variant))
        if run.seed in arm.runs:
            raise DataError(str(RunPaths(run.run_dir).metrics), None, "seed",
                            f"arm {label!r} has seed {run.seed} twice "
                            f"(also {arm.runs[run.seed].run_dir.name})")
        arm.runs[run.seed] = run
    return dict(sorted(arms.items(), key=lambda kv: (kv[1].strategy != "random", kv[0])))


def _is_star(strategy: str) -> bool:
    return strategy.endswith("-dynamic") or "subtract" in strategy


def _baselines(star: Arm, arms: dict[str, Arm]) -> list[Arm]:
    """What `star` is compared with: for a variant, the usual arm of its strategy and
    answers; else ``random`` and the ``pe``/``me`` arms with its answers (no variants)."""
    if star.variant:
        return [b for b in arms.values() if not b.variant and b.strategy == star.strategy
                and b.answers == star.answers]
    return [b for b in arms.values() if not b.variant and (b.strategy == "random" or (
        b.strategy in ("pe", "me") and b.answers == star.answers))]


#: secondary endpoints read from the last round's confidence signals (metrics.jsonl
#: ``signals``, runs since issue 34): (quantity, signals in order of preference, number)
SIGNAL_ENDPOINTS = (("final_aurc", ("msp", "answer"), "rcc-auc"),
                    ("final_sc_auroc", ("consistency",), "roc-auc"))


def run_values(run: StudyRun, rounds: list[int]) -> dict[str, float]:
    """AULC over `rounds`, and accuracy and ECE of the last of them (NaN for no ECE); where
    the last round recorded confidence signals, `SIGNAL_ENDPOINTS` too: the AURC of the
    sequence probability (``msp``; the choice probability for choice tasks) and the AUROC of
    the self-consistency confidence (``evaluation.samples`` > 0)."""
    n = [run.rounds[k]["n_labelled"] for k in rounds]
    acc = [run.rounds[k]["accuracy"] for k in rounds]
    last = run.rounds[rounds[-1]]
    out = {"aulc": aulc(n, acc),
           "final_accuracy": float(last["accuracy"]), "final_ece": float(last["ece"])}
    signals = last.get("signals") or {}
    for quantity, names, number in SIGNAL_ENDPOINTS:
        found = next((signals[n] for n in names if n in signals), None)
        if found is not None:
            v = found.get(number)
            out[quantity] = float("nan") if v is None else float(v)
    return out


def _compare(star: Arm, base: Arm, seeds: list[int], rounds: list[int], items: ItemCorrectness,
             values: dict[tuple[str, int], dict[str, float]]) -> list[Comparison]:
    out = []
    pairs = [(star.runs[s], base.runs[s]) for s in seeds]
    extra = [q for q, _, _ in SIGNAL_ENDPOINTS
             if all(q in values[(a.label, s)] for a in (star, base) for s in seeds)]
    for quantity in ("aulc", "final_accuracy", "final_ece", *extra):
        diffs = [values[(star.label, s)][quantity] - values[(base.label, s)][quantity]
                 for s in seeds]
        if any(np.isnan(diffs)):
            out.append(Comparison(star.label, base.label, quantity, diffs, float("nan"),
                                  (float("nan"), float("nan")), f"{quantity} missing"
                                  if quantity != "final_ece" else "ECE missing"))
            continue
        matrix = "ECE" if quantity not in ("aulc", "final_accuracy") else \
            items.matrix(pairs, rounds, quantity)
        if isinstance(matrix, str):
            ci = bootstrap_diff_ci(diffs, resamples=RESAMPLES, seed=BOOTSTRAP_SEED)
            note = "seeds only" + ("" if matrix == "ECE" else f" ({matrix})")
        else:
            ci = bootstrap_diff_ci(item_diffs=matrix, resamples=RESAMPLES, seed=BOOTSTRAP_SEED)
            note = "seeds x items"
        if len(diffs) > MAX_EXACT:
            p, note = float("nan"), note + f"; no p: over {MAX_EXACT} seeds"
        else:
            p = sign_flip_p(diffs)
        out.append(Comparison(star.label, base.label, quantity, diffs, p, ci, note))
    return out


@dataclass
class Study:
    task: str
    design: str
    rounds: list[int]
    n_labelled: tuple[float, float]
    arms: dict[str, Arm]
    values: dict[tuple[str, int], dict[str, float]]  # (arm, seed) -> run_values
    comparisons: list[Comparison]
    untested: list[str]
    diagnostics: dict[str, dict[int, dict[str, list[float]]]]  # arm -> round -> quantity -> []
    notes: list[str]
    auroc: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # arm -> per run
    declared: Declared | None = None  # the comparisons file that fixed the primary family
    reach: list[ReachRow] = field(default_factory=list)  # with `declared` only
    stops: list[StopRow] = field(default_factory=list)  # with a declared stop_when only


def compute_study(task: str, design: str, runs: list[StudyRun],
                  declared: Declared | None = None) -> Study | None:
    """The study of one group, or None when it has fewer than 2 arms sharing 2 seeds. With
    `declared` (`starlora.study.declared`) the comparisons are the declared pairs."""
    rounds = sorted(set.intersection(*(set(r.rounds) for r in runs)))
    arms = _arms(runs)
    labels = list(arms)
    if not rounds or not any(len(set(arms[a].runs) & set(arms[b].runs)) >= 2
                             for i, a in enumerate(labels) for b in labels[i + 1:]):
        return None
    values = {(a.label, s): run_values(r, rounds) for a in arms.values() for s, r in a.runs.items()}
    items, comparisons, untested = ItemCorrectness(), [], []
    if declared is None:
        pairs = [(star, base, None) for star in arms.values() if _is_star(star.strategy)
                 for base in _baselines(star, arms)]
    else:
        pairs, untested = declared.resolve(arms)
    for star, base, margin in pairs:
        seeds = sorted(set(star.runs) & set(base.runs))
        if len(seeds) < 2:
            untested.append(f"{star.label} vs {base.label} ({len(seeds)} paired seed(s))")
            continue
        found = _compare(star, base, seeds, rounds, items, values)
        for c in found:
            c.primary = c.quantity == "aulc" and (declared is not None or not star.variant)
            if c.primary and margin is not None:
                c.margin = margin
                c.tost_p = tost_p(c.diffs, margin) if len(seeds) <= MAX_EXACT else float("nan")
        comparisons += found
    primary = [c for c in comparisons if c.primary and not np.isnan(c.p)]
    # a declared family is Holm's m: a pair that could not be tested counts as p = 1
    untestable = 0 if declared is None else len(declared.pairs) - len(primary)
    for c, p in zip(primary, holm([c.p for c in primary] + [1.0] * untestable)):
        c.p_holm = p
    for c in primary:
        c.p_floor = min_sign_flip_p(len(c.diffs))
    for c, p in zip(primary, holm([c.p_floor for c in primary] + [1.0] * untestable)):
        c.p_holm_floor = p  # Holm's adjusted p is monotone in every p: its least value
    diagnostics: dict[str, dict[int, dict[str, list[float]]]] = {}
    notes: set[str] = set()
    if longer := [r for r in runs if max(r.rounds) > rounds[-1]]:
        notes.add(f"{len(longer)} run(s) have rounds after round {rounds[-1]}, left out here "
                  "(every number reads the rounds every run has)")
    for star, base, _ in pairs:
        seeds = set(star.runs) & set(base.runs)
        if len(seeds) >= 2 and seeds != set(star.runs) | set(base.runs):
            notes.add(f"{star.label} vs {base.label}: paired on the {len(seeds)} seeds both "
                      f"have ({star.label} has {len(star.runs)}, {base.label} "
                      f"{len(base.runs)})")
    for k in rounds:  # a budget (extendable, so no design setting) can cut some runs' rounds
        counts = sorted({int(r.rounds[k]["n_labelled"]) for r in runs})
        if len(counts) > 1:
            notes.add(f"round {k}: the runs labelled {', '.join(map(str, counts))} examples "
                      "(active_learning.budget?); curves, AULCs and pairs mix these counts")
    pools: dict = {}
    for arm in arms.values():
        per = diagnostics.setdefault(arm.label, defaultdict(lambda: defaultdict(list)))
        for seed in sorted(arm.runs):
            run = arm.runs[seed]
            found, run_notes = run_diagnostics(run.run_dir, run.strategy, run.config, rounds,
                                               pools)
            notes.update(f"{arm.label}: {n}" for n in run_notes)
            if moves := machine_moves(run.run_dir):  # not the bytes of a one-machine run
                notes.add(f"{arm.label}: seed {seed} resumed on another machine at "
                          f"{', '.join(moves)} (identity.json)")
            for k, quantities in found.items():
                for q, v in quantities.items():
                    per[k][q].append(v)
    aurocs = {arm.label: [found for seed in sorted(arm.runs)
                          if (found := run_auroc(arm.runs[seed].run_dir, rounds[-1])) is not None]
              for arm in arms.values()}
    all_n = [r.rounds[k]["n_labelled"] for r in runs for k in (rounds[0], rounds[-1])]
    reach = [] if declared is None else reach_rows(arms, rounds, RESAMPLES, BOOTSTRAP_SEED)
    rule = None if declared is None else declared.stop_when
    stops = ([] if declared is None or rule is None
             else stop_rows(arms, rounds, rule, declared.stop_on))
    return Study(task, design, rounds, (min(all_n), max(all_n)), arms, values, comparisons,
                 untested, diagnostics, sorted(notes), aurocs, declared, reach, stops)
