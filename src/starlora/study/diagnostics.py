"""Per-round diagnostics of one run for the study tables (exploratory, no tests of them).

For each round k of a run directory, from ``rounds/<k>/``:

* ``spearman(pe,pe_base)`` (and ``me``): Spearman's rank correlation between the adapter's
  and the base model's score of the pool items scored that round (``scores.jsonl``), where
  both columns exist;
* ``top-k overlap (pe)``: for a dynamic strategy, the fraction of the selected ids
  (``selected.jsonl``, k of them) that are among the k highest by the adapter's column alone
  (``pe`` for pe-dynamic, ``me`` for me-dynamic; ties by id), i.e. how far the base term and
  λ moved the choice away from plain uncertainty sampling;
* ``selected steps=s``: the fraction of the selected batch with ``meta["steps"] == s`` (tasks
  whose pool examples carry steps, e.g. arith; the pool is rebuilt from the run's config);
* ``selected gold=c``: for choice tasks, the fraction of the selected batch whose gold answer
  is class c (from the rebuilt pool, else the run's ``labelled.jsonl`` answers);
* ``predicted=c``: for choice tasks, the fraction of test predictions of class c
  (``predictions.jsonl``).

Also here, for the secondary endpoint: `run_auroc`, the AUROC of each test-uncertainty column
(``rounds/<k>/test_uncertainty.jsonl``, `starlora.run.uncertainty`) for a wrong answer.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from starlora.config import ExperimentConfig
from starlora.errors import DataError, StarloraError
from starlora.io import read_records
from starlora.run.store import RunPaths
from starlora.run.uncertainty import COLUMNS
from starlora.scoring.results import MEASURES
from starlora.study.stats import auroc, spearman


def read_rows(path: Path) -> list[dict] | None:
    """The objects of a JSONL file, None when it does not exist; DataError names a bad line."""
    if not path.is_file():
        return None
    rows = []
    for lineno, row in read_records(path):
        if "id" not in row:
            raise DataError(str(path), lineno, "id", "missing")
        rows.append(row)
    return rows


@dataclass
class PoolFacts:
    """What the diagnostics know of a run's pool items: ``kind`` is "steps", "gold" or None;
    ``values`` maps an id to its steps or gold class; ``classes`` the task's choice labels;
    ``note`` says why something is missing."""

    kind: str | None = None
    values: dict[str, Any] = field(default_factory=dict)
    classes: tuple[str, ...] = ()
    note: str = ""


def pool_facts(config: ExperimentConfig | None, cache: dict[str, PoolFacts]) -> PoolFacts:
    """The pool of a run's task config, rebuilt with `starlora.run.data` (generated tasks need
    no files; relative data paths are read from the working directory), kept in `cache` per
    task config."""
    if config is None:
        return PoolFacts(note="no config.yaml")
    key = json.dumps(config.task.model_dump(mode="json"), sort_keys=True)
    if key in cache:
        return cache[key]
    from starlora.run.data import load_data, make_task

    classes: tuple[str, ...] = ()
    try:
        task = make_task(config.task)
        classes = tuple(task.choices or ())
        pool = load_data(config.task, task).pool
    except (StarloraError, OSError) as e:
        facts = PoolFacts(classes=classes, note=f"pool not rebuilt ({type(e).__name__})")
    else:
        if pool and all("steps" in ex.meta for ex in pool):
            facts = PoolFacts("steps", {ex.id: ex.meta["steps"] for ex in pool}, classes)
        elif classes:
            facts = PoolFacts("gold", {ex.id: task.gold(ex.answer) for ex in pool
                                       if ex.answer is not None}, classes)
        else:
            facts = PoolFacts(classes=classes)
    cache[key] = facts
    return facts


def _labelled_gold(run_dir: Path, config: ExperimentConfig) -> dict[str, Any]:
    """Gold classes of the run's labelled ids from ``labelled.jsonl`` (the oracle's answers)."""
    from starlora.run.data import make_task

    task = make_task(config.task)
    rows = read_rows(RunPaths(run_dir).labelled) or []
    return {r["id"]: task.gold(r["answer"]) for r in rows if isinstance(r.get("answer"), str)}


def _share(values: list[Any], classes: list[Any], name: str) -> dict[str, float]:
    counts = Counter(values)
    return {f"{name}={c}": counts.get(c, 0) / len(values) for c in classes} if values else {}


def run_diagnostics(run_dir: Path, strategy: str, config: ExperimentConfig | None,
                    rounds: list[int], cache: dict[str, PoolFacts] | None = None,
                    ) -> tuple[dict[int, dict[str, float]], list[str]]:
    """``({round: {quantity: value}}, notes)`` of one run over `rounds` (see module doc);
    `cache` keeps rebuilt pools between calls."""
    paths = RunPaths(run_dir)
    facts = pool_facts(config, {} if cache is None else cache)
    notes = [facts.note] if facts.note else []
    values = facts.values
    if facts.kind is None and facts.classes and config is not None:
        values, kind = _labelled_gold(run_dir, config), "gold"
        notes = [n + "; gold classes from labelled.jsonl" for n in notes]
    else:
        kind = facts.kind
    measure = strategy.split("-")[0] if strategy.endswith("-dynamic") else None
    out: dict[int, dict[str, float]] = {}
    for k in rounds:
        got: dict[str, float] = {}
        scores = read_rows(paths.round_file(k, "scores.jsonl")) or []
        selected = read_rows(paths.round_file(k, "selected.jsonl")) or []
        for m in MEASURES:
            if scores and all(m in r and f"{m}_base" in r for r in scores):
                rho = spearman([r[m] for r in scores], [r[f"{m}_base"] for r in scores])
                got[f"spearman({m},{m}_base)"] = rho
        if measure and selected and scores and all(measure in r for r in scores):
            top = sorted(scores, key=lambda r: (-float(r[measure]), str(r["id"])))
            top_ids = {r["id"] for r in top[: len(selected)]}
            chosen = {r["id"] for r in selected}
            got[f"top-k overlap ({measure})"] = len(top_ids & chosen) / len(chosen)
        if selected and kind == "steps":
            steps = [values.get(r["id"]) for r in selected]
            if None not in steps:
                got.update(_share(steps, sorted(set(values.values())), "selected steps"))
        elif selected and kind == "gold":
            gold = [values.get(r["id"]) for r in selected]
            if None not in gold:
                got.update(_share(gold, list(facts.classes), "selected gold"))
        predictions = read_rows(paths.round_file(k, "predictions.jsonl"))
        if predictions and facts.classes:
            preds = [p.get("prediction") for p in predictions]
            got.update(_share(preds, list(facts.classes), "predicted"))
        if got:
            out[k] = {q: float(v) for q, v in got.items() if not np.isnan(v)}
    return out, notes


def run_auroc(run_dir: Path, round_: int) -> dict[str, float] | None:
    """AUROC of each column of round `round_`'s ``test_uncertainty.jsonl`` (`COLUMNS`) for
    predicting a wrong answer (``correct`` false is the positive class), over the items whose
    value is not null; None when the file does not exist. DataError names a bad line."""
    path = RunPaths(run_dir).test_uncertainty(round_)
    rows = read_rows(path)
    if rows is None:
        return None
    for lineno, row in enumerate(rows, start=1):
        for name in ("correct", *COLUMNS):
            if name not in row:
                raise DataError(str(path), lineno, name, "missing")
    out = {}
    for c in COLUMNS:
        kept = [r for r in rows if r[c] is not None and np.isfinite(r[c])]
        out[c] = auroc([r[c] for r in kept], [not r["correct"] for r in kept])
    return out
