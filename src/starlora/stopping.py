"""Label-free stopping: when has another round of labels stopped changing the model?

A run may set aside a *stop set* (``active_learning.stop_set: N``): N pool items drawn once by
their own random stream, never selected and never labelled. After each round the model answers
them, and two numbers are recorded (Bloodgood and Vijay-Shanker's stabilising predictions, as
compared by Pullar-Strecker et al., Machine Learning 2024):

* ``stop_agreement``: agreement of this round's extracted answers with the previous round's:
  Cohen's kappa for choice tasks, the exact-match share otherwise (None in round 0);
* ``stop_uncertainty``: the mean uncertainty of the stop set, 1 - confidence, where the
  confidence is the choice probability for choice tasks and the geometric-mean token
  probability of the generated answer (``perplexity`` signal) otherwise.

``active_learning.stop_when`` is a rule over one of them, ``<signal> <op> <threshold> [for <n>
rounds]`` (signal ``agreement`` or ``uncertainty``, op one of ``>= > <= <``, n default 1), or
``none`` (the default): the run ends after the first round where the rule has held for n
consecutive rounds. A round without the signal (round 0's agreement) never satisfies it.
Pure functions: numbers in, a decision out.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass

SIGNALS = {"agreement": "stop_agreement", "uncertainty": "stop_uncertainty"}
_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
_RULE = re.compile(r"^\s*(agreement|uncertainty)\s*(>=|<=|>|<)\s*([-+]?[0-9]*\.?[0-9]+"
                   r"(?:[eE][-+]?[0-9]+)?)\s*(?:for\s+([0-9]+)\s+rounds?)?\s*$")


@dataclass(frozen=True)
class StopRule:
    """``signal op threshold`` held for `rounds` consecutive rounds."""

    signal: str  # a key of SIGNALS
    op: str  # a key of _OPS
    threshold: float
    rounds: int = 1

    @property
    def field(self) -> str:
        """The metrics.jsonl field the rule reads."""
        return SIGNALS[self.signal]

    def holds(self, value: float | None) -> bool:
        return value is not None and bool(_OPS[self.op](value, self.threshold))

    def __str__(self) -> str:
        return f"{self.signal} {self.op} {self.threshold:g} for {self.rounds} rounds"


def parse_rule(text: str) -> StopRule | None:
    """The rule `text` names, None for ``none``; ValueError naming the grammar otherwise."""
    if text.strip().lower() == "none":
        return None
    found = _RULE.match(text)
    if not found or (found.group(4) is not None and int(found.group(4)) < 1):
        raise ValueError(f"{text!r} is not a stopping rule: write 'none' or '<agreement|"
                         "uncertainty> <>=|>|<=|<> <number> [for <n> rounds]', e.g. "
                         "'agreement >= 0.95 for 2 rounds'")
    signal, op, threshold, rounds = found.groups()
    return StopRule(signal, op, float(threshold), int(rounds) if rounds else 1)


def stop_index(rule: StopRule | None, values: Sequence[float | None]) -> int | None:
    """The first index i of `values` (one per round, in order) at which `rule` has held for
    ``rule.rounds`` consecutive values ending at i; None if it never does (or no rule)."""
    if rule is None:
        return None
    run = 0
    for i, v in enumerate(values):
        run = run + 1 if rule.holds(v) else 0
        if run >= rule.rounds:
            return i
    return None


def stop_signals(previous: list[dict] | None, current: list[dict], choice: bool
                 ) -> dict[str, float | None]:
    """``stop_agreement`` and ``stop_uncertainty`` (module doc) of a round's stop-set
    predictions `current` (rows of ``stop.jsonl``: ``id``, ``prediction``, ``confidence``
    and, for generated answers, ``logprob_mean``) against the previous round's (None in
    round 0; rows are matched by id)."""
    from starlora.confidence import exact_match, kappa

    if choice:
        sure = [float(r["confidence"]) for r in current]
    else:
        sure = [math.exp(float(r["logprob_mean"])) for r in current]
    out: dict[str, float | None] = {
        "stop_agreement": None,
        "stop_uncertainty": 1.0 - sum(sure) / len(sure) if sure else None}
    if previous:
        before = {r["id"]: r["prediction"] for r in previous}
        kept = [r for r in current if r["id"] in before]
        a, b = [before[r["id"]] for r in kept], [r["prediction"] for r in kept]
        if kept:
            out["stop_agreement"] = kappa(a, b) if choice else exact_match(a, b)
    return out
