"""Per-item correctness of runs' rounds, for the study's bootstrap over seeds and test items
(`starlora.study.arms`): each round's ``predictions.jsonl``, read once."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from starlora.run.store import RunPaths
from starlora.study.diagnostics import read_rows
from starlora.study.stats import aulc_weights

if TYPE_CHECKING:  # arms.py imports this module
    from starlora.study.groups import StudyRun


class ItemCorrectness:
    """Per-item correctness of runs' rounds (``predictions.jsonl``), read once."""

    def __init__(self) -> None:
        self.cache: dict[tuple[Path, int], tuple[list[str], np.ndarray] | str] = {}

    def get(self, run: StudyRun, k: int) -> tuple[list[str], np.ndarray] | str:
        key = (run.run_dir, k)
        if key not in self.cache:
            rows = read_rows(RunPaths(run.run_dir).round_file(k, "predictions.jsonl"))
            if rows is None:
                self.cache[key] = "no predictions.jsonl"
            else:
                rows = sorted(rows, key=lambda r: str(r["id"]))
                correct = np.array([float(bool(r.get("correct"))) for r in rows])
                if not rows or abs(correct.mean() - run.rounds[k]["accuracy"]) > 1e-9:
                    self.cache[key] = "predictions disagree with metrics.jsonl"
                else:
                    self.cache[key] = ([str(r["id"]) for r in rows], correct)
        return self.cache[key]

    def matrix(self, pairs: list[tuple[StudyRun, StudyRun]], rounds: list[int],
               quantity: str) -> np.ndarray | str:
        """[seeds, items]: per item, arm A's weighted correctness minus arm B's (weights: AULC
        over `rounds`, or the last round for final accuracy); a reason when it cannot."""
        ids, out = None, []
        for pair in pairs:
            diff = 0.0
            for sign, run in zip((1.0, -1.0), pair):
                n = [run.rounds[k]["n_labelled"] for k in rounds]
                w = aulc_weights(n) if quantity == "aulc" else np.eye(len(rounds))[-1]
                for k, wk in zip(rounds, w):
                    got = self.get(run, k)
                    if isinstance(got, str):
                        return got
                    if ids is None:
                        ids = got[0]
                    elif got[0] != ids:
                        return "runs were evaluated on different test items"
                    diff = diff + sign * wk * got[1]
            out.append(diff)
        return np.vstack(out)
