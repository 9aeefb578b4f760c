"""The result of scoring: `Scores`, N examples' PE and ME (and per-pass values)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: the measures the engine computes (see `starlora.scoring.measures`)
MEASURES = ("pe", "me")


def _count(x: float) -> int | float:
    """A token count for JSON: an int, or a float when it is a mean over samples."""
    return int(x) if float(x).is_integer() else float(x)


def _counts(values: Sequence[int | float]) -> np.ndarray:
    """Token counts read back: int64, or float64 when any is a mean over samples."""
    exact = all(float(v).is_integer() for v in values)
    return np.array(values, np.int64 if exact else np.float64)


@dataclass
class Scores:
    """Scores of N examples, aligned with `ids`; every array [N] float64 in nats, NaN for a
    measure not computed.

    `pe`, `me`: the measure summed over the answer tokens, averaged over the K MC passes;
    `pe_per_token`, `me_per_token`: the same divided by `n_answer_tokens`;
    `n_answer_tokens`: the answer tokens scored (int64), or their mean over the generated
    answers of an example when its scores are averaged over several (float64, `mean_over`);
    `pe_passes`, `me_passes`: ``[N, K]`` per-pass values when K > 1, else None."""

    ids: list[str]
    pe: np.ndarray
    pe_per_token: np.ndarray
    me: np.ndarray
    me_per_token: np.ndarray
    n_answer_tokens: np.ndarray
    pe_passes: np.ndarray | None = None
    me_passes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def to_records(self) -> list[dict[str, Any]]:
        """One JSON-able dict per example; measures not computed are ``None``."""

        def num(x: float) -> float | None:
            return None if math.isnan(x) else float(x)

        records = []
        for i, id_ in enumerate(self.ids):
            rec: dict[str, Any] = {
                "id": id_,
                "pe": num(self.pe[i]),
                "pe_per_token": num(self.pe_per_token[i]),
                "me": num(self.me[i]),
                "me_per_token": num(self.me_per_token[i]),
                "n_answer_tokens": _count(self.n_answer_tokens[i]),
            }
            if self.pe_passes is not None:
                rec["pe_passes"] = [num(x) for x in self.pe_passes[i]]
            if self.me_passes is not None:
                rec["me_passes"] = [num(x) for x in self.me_passes[i]]
            records.append(rec)
        return records

    @classmethod
    def from_records(cls, records: Sequence[dict[str, Any]]) -> Scores:
        def col(name: str) -> np.ndarray:
            return np.array([np.nan if r[name] is None else r[name] for r in records], np.float64)

        def passes(name: str) -> np.ndarray | None:
            if not records or name not in records[0]:
                return None
            return np.array(
                [[np.nan if x is None else x for x in r[name]] for r in records], np.float64
            )

        return cls(
            ids=[str(r["id"]) for r in records],
            pe=col("pe"),
            pe_per_token=col("pe_per_token"),
            me=col("me"),
            me_per_token=col("me_per_token"),
            n_answer_tokens=_counts([r["n_answer_tokens"] for r in records]),
            pe_passes=passes("pe_passes"),
            me_passes=passes("me_passes"),
        )

    def mean_over(self, samples: int) -> Scores:
        """Scores of N examples from these N * `samples` rows (grouped by example): every
        measure, its per-token mean and per-pass values averaged over the samples."""
        if samples == 1:
            return self
        n = len(self.ids) // samples

        def avg(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a.reshape(n, samples, *a.shape[1:]).mean(axis=1)

        return Scores(
            ids=self.ids[::samples], pe=avg(self.pe), pe_per_token=avg(self.pe_per_token), me=avg(self.me),
            me_per_token=avg(self.me_per_token), n_answer_tokens=avg(self.n_answer_tokens),
            pe_passes=avg(self.pe_passes), me_passes=avg(self.me_passes),
        )

    def select(self, ids: Sequence[str]) -> Scores:
        """Scores of `ids`, in that order (KeyError for an unknown id)."""
        where = {id_: i for i, id_ in enumerate(self.ids)}
        idx = np.array([where[i] for i in ids], np.int64)
        return Scores(
            ids=[self.ids[i] for i in idx],
            pe=self.pe[idx],
            pe_per_token=self.pe_per_token[idx],
            me=self.me[idx],
            me_per_token=self.me_per_token[idx],
            n_answer_tokens=self.n_answer_tokens[idx],
            pe_passes=None if self.pe_passes is None else self.pe_passes[idx],
            me_passes=None if self.me_passes is None else self.me_passes[idx],
        )
