"""Which runs form one study: runs of one task whose configs agree on every design setting
and that computed with the same precision and data (`starlora.study.arms` module doc).

A study's design id is a hash of the design settings (``config.yaml``; the protocol id for a
run without one). ``identity.json`` (`starlora.run.identity.started_with`) adds what a config
that says ``dtype: auto`` does not fix: the precision the run resolved and a hash of its pool,
test and ``task.labelled`` examples. Where the runs of one design recorded different values
of these, the design is split, one study per combination, and each split study's id names
what sets it apart (``1a2b3c4d [precision=fp32_fp32_fp32]``, ``1a2b3c4d [test=0a1b2c3d]``;
``unrecorded`` for runs without the record); a design whose runs agree keeps its plain id.
Each split is said on stderr.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlora.config import ExperimentConfig, flatten_config, load_config
from starlora.errors import StarloraError
from starlora.run.identity import started_with
from starlora.run.protocol import (
    EXTENDABLE,
    RESULT_NEUTRAL,
    STOPPING,
    identity,
    precision_name,
)
from starlora.run.store import RunPaths

NOT_ARM = RESULT_NEUTRAL | EXTENDABLE | STOPPING | {"seed", "active_learning.strategy"}
METHOD_PREFIXES = ("scoring.", "lora.", "training.")
METHOD_KEYS = frozenset({"active_learning.strategy", "active_learning.lambda_schedule",
                         "active_learning.lambda_start", "active_learning.lambda_end",
                         "active_learning.normalize", "active_learning.diversity",
                         "active_learning.diversity_pool"})
#: what identity.json adds to a design, in this order in a split study's id
RECORDED = ("precision", "pool", "test", "labelled")


@dataclass
class StudyRun:
    """One run directory: its metrics by round and its config (None when unreadable)."""

    run_dir: Path
    task: str
    protocol: str
    strategy: str
    seed: int
    config: ExperimentConfig | None
    rounds: dict[int, dict[str, Any]]

    @property
    def flat(self) -> dict[str, Any] | None:
        return None if self.config is None else flatten_config(self.config)


def _design(key: str) -> bool:
    return not (key in NOT_ARM or key in METHOD_KEYS or key.startswith(METHOD_PREFIXES))


def recorded_design(run: StudyRun) -> dict[str, str]:
    """`RECORDED` values of `run` from its ``identity.json``: the short precision name and the
    first 8 hex digits of each split's hash; a value it did not record is left out. The pool's
    hash is left out for a human-oracle run (it covers the pool's answers only where the run
    reads them, which depends on the arm's ``scoring.answers``)."""
    found = started_with(run.run_dir)
    out = {} if found["precision"] is None else {"precision": precision_name(found["precision"])}
    human = run.config is not None and run.config.active_learning.oracle != "simulated"
    for split, sha1 in (found["data"] or {}).items():
        if split in RECORDED and not (split == "pool" and human):
            out[split] = sha1[:8]
    return out


def _split(task: str, design: str, runs: list[StudyRun]) -> dict[tuple[str, str], list[StudyRun]]:
    """`runs` of one design, split by the `RECORDED` values whose recorded values differ."""
    found = [recorded_design(r) for r in runs]
    differ = [k for k in RECORDED if len({f[k] for f in found if k in f}) > 1]
    if not differ:
        return {(task, design): runs}
    out: dict[tuple[str, str], list[StudyRun]] = defaultdict(list)
    for run, f in zip(runs, found):
        parts = ", ".join(f"{k}={f.get(k, 'unrecorded')}" for k in differ)
        out[(task, f"{design} [{parts}]")].append(run)
    sizes = "; ".join(f"{d}: {len(r)} run(s)" for (_, d), r in sorted(out.items()))
    print(f"note: study {task} (design {design}) split: its runs differ in "
          f"{', '.join(differ)} (identity.json), which config.yaml does not fix; {sizes}",
          file=sys.stderr)
    return out


def study_groups(records: list[dict[str, Any]]) -> dict[tuple[str, str], list[StudyRun]]:
    """``{(task, design id): runs}`` from `starlora.report.load_runs` records (module doc)."""
    by_dir: dict[Path, dict[int, dict]] = defaultdict(dict)
    for rec in records:
        by_dir[rec["run_dir"]][rec["round"]] = rec
    groups: dict[tuple[str, str], list[StudyRun]] = defaultdict(list)
    for run_dir, rounds in sorted(by_dir.items()):
        last = rounds[max(rounds)]
        config = None
        if RunPaths(run_dir).config.is_file():
            try:
                config = load_config(RunPaths(run_dir).config, stored=True)
            except StarloraError:
                config = None
        run = StudyRun(run_dir, last["task"], last["protocol"], last["strategy"], last["seed"],
                       config, rounds)
        flat = run.flat
        if flat is None:
            design = run.protocol
        else:
            kept = {k: v for k, v in identity(flat).items() if _design(k)}
            design = hashlib.sha1(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:8]
        groups[(run.task, design)].append(run)
    out: dict[tuple[str, str], list[StudyRun]] = {}
    for (task, design), runs in groups.items():
        out.update(_split(task, design, runs))
    return dict(sorted(out.items()))
