"""Declared comparisons: the primary family a study protocol fixes before its first run.

By default the study (`starlora.study.arms`) compares each STAR arm with ``random`` and with
``pe``/``me``: the first study's family. A protocol that declares other arms (a repaired STAR
arm labelled ``pe-dynamic [normalize=raw_full]``, ``typiclust``...) hands its own family to
``starlora report --comparisons FILE``, a YAML file::

    # results/study-2/comparisons.yaml
    primary:                                # AULC; exact sign-flip test; Holm over the list
      - {arm: "pe-dynamic [normalize=raw_full]", baseline: random}
      - {arm: "pe-dynamic [normalize=raw_full]", baseline: pe, margin: 0.03}
    stop_when: "agreement >= 0.5 for 2 rounds"   # optional: the stop point, per arm
    stop_on: test                           # optional: stop_set (default) or test

Each entry is one comparison, arm minus baseline, paired by seed; both are arm labels as the
study names them (the ``## Arms`` table of ``study.md``). ``margin`` (optional, AULC units,
> 0) adds an equivalence verdict: the TOST p of `starlora.study.stats.tost_p` (two exact
one-sided sign-flip tests; p < alpha says the mean difference lies within ±margin),
uncorrected. With a declaration the study compares exactly the declared pairs (no automatic
STAR or variant comparisons) and adds, per arm, the labelled count at which its mean curve
first reaches ``random``'s final mean accuracy (`reach_rows`). ``stop_when`` (optional; the
grammar of ``active_learning.stop_when``, `starlora.stopping`) adds, per arm, where that rule
would have stopped each run, read retrospectively from the stop-set signals its
``metrics.jsonl`` recorded (`stop_rows`), or, with ``stop_on: test``, from the same signals
computed on its test answers (`answer_signals`: each round's ``predictions.jsonl`` against
the previous round's, the prompts as the unlabelled set; no gold answer is read), which
costs a study nothing where its runs set no stop set aside.

A declared arm that no group of the report has is an error naming the file and line; a group
that lacks one of a pair's arms lists the pair under "Not tested".
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from starlora.errors import DataError
from starlora.run.store import RunPaths
from starlora.stopping import StopRule, parse_rule, stop_index, stop_signals
from starlora.study.diagnostics import read_rows
from starlora.study.stats import first_reach

if TYPE_CHECKING:  # arms.py imports this module
    from starlora.study.arms import Arm
    from starlora.study.groups import StudyRun

KEYS = ("primary", "stop_when", "stop_on")  # the file's top-level keys
STOP_ON = ("stop_set", "test")  # where `stop_rows` reads the rule's signal
FIELDS = {"arm": str, "baseline": str, "margin": (int, float)}  # of a `primary` entry
REFERENCE = "random"  # whose final accuracy `reach_rows` measures the others against


@dataclass(frozen=True)
class DeclaredPair:
    """One declared comparison: `arm` minus `baseline` (arm labels); `margin`: the TOST
    equivalence margin in AULC units, or None; `line`: its line in the file (1-based)."""

    arm: str
    baseline: str
    margin: float | None
    line: int


@dataclass(frozen=True)
class Declared:
    """The declared family (`pairs`, in file order) of the file at `path` whose content
    hashes to `sha256` (the first 12 hex digits): the tables cite its name and hash."""

    path: str
    sha256: str
    pairs: tuple[DeclaredPair, ...]
    stop_when: StopRule | None = None
    stop_on: str = "stop_set"  # one of STOP_ON

    def citation(self) -> str:
        return f"`{Path(self.path).name}` (sha256 {self.sha256})"

    def resolve(self, arms: dict[str, Arm]) -> tuple[list[tuple[Arm, Arm, float | None]],
                                                     list[str]]:
        """The declared pairs whose two arms this group has, as (arm, baseline, margin), and
        a "Not tested" line for each of the others."""
        found, missing = [], []
        for p in self.pairs:
            absent = [a for a in (p.arm, p.baseline) if a not in arms]
            if absent:
                missing.append(f"{p.arm} vs {p.baseline} (no arm {', '.join(absent)} here)")
            else:
                found.append((arms[p.arm], arms[p.baseline], p.margin))
        return found, missing

    def check_used(self, labels: set[str]) -> None:
        """Raise DataError for a declared arm that none of `labels` (every study group's arm
        labels) is: most likely a typo, which would otherwise leave a pair silently untested."""
        for p in self.pairs:
            for what in ("arm", "baseline"):
                label = getattr(p, what)
                if label not in labels:
                    known = ", ".join(sorted(labels)) or "none"
                    raise DataError(self.path, p.line, what,
                                    f"no study arm is labelled {label!r} (arms: {known})")


def load_declared(path: str | Path) -> Declared:
    """Read a comparisons file (module doc). Raises DataError naming the file, line and field
    for anything else: unknown keys, a missing or mistyped field, a margin that is not
    positive, an arm compared with itself, or a pair declared twice."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        root = yaml.compose(text)
    except OSError as e:
        raise DataError(str(path), None, None, f"cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise DataError(str(path), mark.line + 1 if mark else None, None,
                        f"not YAML ({getattr(e, 'problem', e)})") from None

    def fail(node: Any, field: str | None, problem: str) -> DataError:
        line = node.start_mark.line + 1 if node is not None else None
        return DataError(str(path), line, field, problem)

    if not isinstance(root, yaml.MappingNode):
        raise fail(root, None, "expected a mapping with the key `primary`")
    top = {k.value: v for k, v in root.value}
    for key, _ in root.value:
        if key.value not in KEYS:
            raise fail(key, key.value, f"unknown key (the file has: {', '.join(KEYS)})")
    rule = None
    if "stop_when" in top:
        node = top["stop_when"]
        try:
            if not isinstance(node, yaml.ScalarNode):
                raise ValueError("expected a rule, e.g. 'agreement >= 0.95 for 2 rounds'")
            rule = parse_rule(node.value)
        except ValueError as e:
            raise fail(node, "stop_when", str(e)) from None
    stop_on = "stop_set"
    if "stop_on" in top:
        node = top["stop_on"]
        if not isinstance(node, yaml.ScalarNode) or node.value not in STOP_ON:
            raise fail(node, "stop_on", f"expected one of {', '.join(STOP_ON)}")
        if rule is None:
            raise fail(node, "stop_on", "needs a stop_when rule")
        stop_on = node.value
    entries = top.get("primary")
    if not isinstance(entries, yaml.SequenceNode) or not entries.value:
        raise fail(entries or root, "primary", "expected a non-empty list of comparisons")
    pairs, seen = [], {}
    for node in entries.value:
        if not isinstance(node, yaml.MappingNode):
            raise fail(node, None, "expected a mapping {arm, baseline, margin}")
        data = yaml.safe_load(yaml.serialize(node))
        keys = {k.value: k for k, _ in node.value}
        for key in keys:
            if key not in FIELDS:
                raise fail(keys[key], key, f"unknown field (fields: {', '.join(FIELDS)})")
        for key, types in FIELDS.items():
            if key == "margin" and data.get(key) is None:
                continue
            if key not in data:
                raise fail(node, key, "missing")
            value = data[key]
            if not isinstance(value, types) or isinstance(value, bool) or value == "":
                raise fail(keys[key], key, f"wrong type or empty: {value!r}")
        margin = data.get("margin")
        if margin is not None and not (np.isfinite(margin) and margin > 0):
            raise fail(keys["margin"], "margin", f"must be a positive number, got {margin!r}")
        if data["arm"] == data["baseline"]:
            raise fail(node, "baseline", "an arm compared with itself")
        key = (data["arm"], data["baseline"])
        if key in seen:
            raise fail(node, None, f"{key[0]} vs {key[1]} declared twice (also line {seen[key]})")
        seen[key] = node.start_mark.line + 1
        pairs.append(DeclaredPair(data["arm"], data["baseline"],
                                  None if margin is None else float(margin), seen[key]))
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    return Declared(str(path), digest, tuple(pairs), rule, stop_on)


@dataclass(frozen=True)
class ReachRow:
    """When `arm`'s mean curve first reaches ``random``'s final mean accuracy, over the
    `seeds` both arms have: `n` labelled (linear between rounds; inf: never), `saved` =
    random's final labelled count − `n`, and a percentile bootstrap interval of `n` over
    seeds (`ci`; inf where the resamples that never reach it lie in the tail) with the share
    of resamples that reach it."""

    arm: str
    seeds: int
    target: float
    n: float
    saved: float
    ci: tuple[float, float]
    reached: float


def reach_rows(arms: dict[str, Arm], rounds: list[int], resamples: int,
               seed: int) -> list[ReachRow]:
    """A `ReachRow` per arm (``random`` itself and arms sharing under 2 seeds with it left
    out). The bootstrap draws seeds with replacement (NumPy `seed`), the same draw for the arm
    and ``random``, so both the curve and the target vary; the interval takes the 2.5th and
    97.5th of the drawn counts (inverted CDF: a drawn value, inf included)."""
    ref = next((a for a in arms.values() if a.label == REFERENCE), None)
    if ref is None:
        return []
    out = []
    for arm in arms.values():
        common = sorted(set(arm.runs) & set(ref.runs))
        if arm is ref or len(common) < 2:
            continue
        acc, base = ([[a.runs[s].rounds[k]["accuracy"] for k in rounds] for s in common]
                     for a in (arm, ref))
        acc, base = np.asarray(acc, np.float64), np.asarray(base, np.float64)
        n = np.mean([[arm.runs[s].rounds[k]["n_labelled"] for k in rounds] for s in common], 0)
        final_n = float(np.mean([ref.runs[s].rounds[rounds[-1]]["n_labelled"] for s in common]))
        target = float(base[:, -1].mean())
        reach = first_reach(n, acc.mean(0), target)
        draws = np.random.default_rng(seed).integers(0, len(common), (resamples, len(common)))
        boot = np.array([first_reach(n, acc[d].mean(0), base[d, -1].mean()) for d in draws])
        lo, hi = np.quantile(boot, [0.025, 0.975], method="inverted_cdf")
        out.append(ReachRow(arm.label, len(common), target, reach, final_n - reach,
                            (float(lo), float(hi)), float(np.isfinite(boot).mean())))
    return out


@dataclass(frozen=True)
class StopRow:
    """Where `rule` would have stopped `arm`'s runs (over the `seeds` that recorded its
    signal): how many stopped before their last round, the mean labelled count and accuracy
    at the stop (the last round where it never fires), the mean final accuracy, and their
    differences (labels saved, accuracy lost: final minus at the stop)."""

    arm: str
    seeds: int
    stopped: int
    n: float
    accuracy: float
    final_accuracy: float
    saved: float
    lost: float


def answer_signals(run: StudyRun, rounds: list[int]) -> list[dict[str, float | None]] | None:
    """Per round of `rounds`, the stop set's signals (`starlora.stopping.stop_signals`) with
    the run's test prompts as the unlabelled set: each round's answers (``predictions.jsonl``:
    ``id``, ``prediction`` and the confidence fields, never ``gold`` or ``correct``) against
    the previous round of `rounds`. None when a round has no predictions."""
    out, previous = [], None
    for k in rounds:
        rows = read_rows(RunPaths(run.run_dir).round_file(k, "predictions.jsonl"))
        if not rows:
            return None
        rows = [{f: r[f] for f in ("id", "prediction", "confidence", "logprob_mean") if f in r}
                for r in rows]
        out.append(stop_signals(previous, rows, choice="logprob_mean" not in rows[0]))
        previous = rows
    return out


def stop_rows(arms: dict[str, Arm], rounds: list[int], rule: StopRule,
              on: str = "stop_set") -> list[StopRow]:
    """A `StopRow` per arm whose runs have `rule`'s signal over `rounds`: recorded in
    ``metrics.jsonl`` (``stop_agreement`` / ``stop_uncertainty``, runs with
    ``active_learning.stop_set``), or with `on` ``test`` computed from their test answers
    (`answer_signals`); arms without it are left out."""
    out = []
    for arm in arms.values():
        per = []
        for seed in sorted(arm.runs):
            recs = [arm.runs[seed].rounds[k] for k in rounds]
            signals = recs if on == "stop_set" else answer_signals(arm.runs[seed], rounds)
            if signals is None or all(r.get(rule.field) is None for r in signals):
                continue
            i = stop_index(rule, [r.get(rule.field) for r in signals])
            at = recs[-1 if i is None else i]
            per.append((i is not None and i < len(recs) - 1, at["n_labelled"], at["accuracy"],
                        recs[-1]["n_labelled"], recs[-1]["accuracy"]))
        if per:
            a = np.asarray([row[1:] for row in per], np.float64).mean(0)
            out.append(StopRow(arm.label, len(per), sum(row[0] for row in per), float(a[0]),
                               float(a[1]), float(a[3]), float(a[2] - a[0]), float(a[3] - a[1])))
    return out
