"""A run's identity: what makes two runs comparable, which settings may change on resume, how
many rounds it plans, and every random stream it draws from. This module is the one owner of
those facts; the loop, the run store and the report read them from here.

Settings fall in three groups:

* **result-neutral** (`RESULT_NEUTRAL`): how the work is done, not what it computes (batch
  sizes, device, output options). They may change when a run resumes. They can move results
  only by floating-point rounding, with one exception stated here so nobody trips on it: with
  MC-dropout passes, the scorer seeds its masks per batch, so `scoring.batch_size` and
  `scoring.max_tokens_per_batch` decide which mask each example gets.
* **extendable** (`EXTENDABLE`): `active_learning.rounds` and `budget`. Raising them on a
  finished run adds rounds and leaves the rounds already done byte-identical (they are never
  recomputed). The λ schedule keeps the plan the run started with (`starlora.run.identity.
  first_plan`): the queries an extension adds keep the λ of its last query, and each round
  records the λ it was selected with (``metrics.jsonl``, ``selected.jsonl``).
* **stopping** (`STOPPING`): ``active_learning.stop_when`` decides how many rounds run, never
  what a round computes; it may change on resume (a run the rule ended goes on under
  ``none``) and is not part of the protocol id.
* everything else changes results: a run directory refuses a config that differs there.

Settings added after runs were committed (`ADDED_LATER`, owned by `starlora.config`) are left
out of the protocol id, and of the study's design, while they hold the value runs had before
the setting existed: a run made before a setting existed, and one made after with the setting
at that value, are the same experiment and keep one id, even after the default changes.

The protocol id (`protocol_id`) names what makes runs comparable: every setting except the
strategy, the seed and the two groups above. Runs with one protocol id and different
strategies or seeds are arms of one comparison; `starlora report` groups by it.

Random streams (`STREAMS`, `stream`, `phase_seed`; defined in `starlora.seeds`, which every
module that draws a seed goes through): one independent stream per (seed, round, phase), from
NumPy's `SeedSequence`, so that no phase's draws depend on how much another phase drew, and a
phase redone after a kill draws exactly what it drew the first time.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

# settings added after runs were committed, with the value runs had before: defined with the
# config (what a stored config.yaml that lacks one means); part of the identity only away from it
from starlora.config import ADDED_LATER as ADDED_LATER
from starlora.config import ExperimentConfig, flatten_config

# a run's random streams: named and drawn in `starlora.seeds` (the bottom layer, so that
# training draws from the same owner), read from here by the run layer
from starlora.seeds import STREAMS as STREAMS
from starlora.seeds import phase_seed as phase_seed
from starlora.seeds import stream as stream

#: phases of one round, in order; state.json records the last one finished
PHASES = ("train", "evaluate", "score", "select", "label")
#: state.json's ``stopped`` of a run whose rounds outlast its pool (``take_rest``): it ends
#: after the round that trained on the whole pool (any other ``stopped``: its stop_when)
USED_UP = "pool used up"

#: settings that change how the work is done, not its results (see the module docstring)
RESULT_NEUTRAL = frozenset({
    "scoring.batch_size", "scoring.max_tokens_per_batch", "evaluation.batch_size",
    "model.device", "output.run_dir", "output.report_to", "output.keep_adapters",
})
#: settings that may grow on a finished run: they add rounds, never redo one
EXTENDABLE = frozenset({"active_learning.rounds", "active_learning.budget"})
#: settings that are not part of the protocol id: they tell arms and replicates apart
ARM = frozenset({"active_learning.strategy", "seed"})
#: how many rounds run, not what a round computes (see the module docstring)
STOPPING = frozenset({"active_learning.stop_when"})



def planned_rounds(config: ExperimentConfig, n_initial: int | None = None) -> int:
    """Training rounds to run: `rounds`, fewer if `budget` is reached earlier. `n_initial`:
    the size of round 0's labelled set when it is not `initial_size` (a `task.labelled` file
    replaces the draw), so that every query asks for at least one example."""
    al = config.active_learning
    if al.budget is None:
        return al.rounds
    n0 = al.initial_size if n_initial is None else n_initial
    return min(al.rounds, 1 + max(0, math.ceil((al.budget - n0) / al.query_size)))


#: settings whose ``auto`` resolves by hardware; their resolved values are part of the identity
#: (`starlora.run.identity`) and of the protocol id, in this order
PRECISION_KEYS = ("model.dtype", "scoring.dtype", "training.mixed_precision")
#: short names of resolved dtypes in a protocol id's precision suffix
_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "no": "fp32"}


def protocol_id(config: ExperimentConfig, precision: dict[str, str] | None = None) -> str:
    """``<task>-<initial>+<query>-<hash>[-<model>_<scoring>_<training>]``: the same for every
    arm and seed of a comparison, and for a run extended with more rounds (see the module
    docstring). `precision`: the resolved dtypes of ``model.dtype``, ``scoring.dtype`` and
    ``training.mixed_precision`` (`starlora.run.identity`), e.g. ``-fp32_bf16_bf16``, so that
    runs computed in different precisions are never one comparison; None (runs from before
    the precision was recorded) leaves the suffix out."""
    flat = identity(flatten_config(config))
    kept = {k: v for k, v in flat.items()
            if k not in RESULT_NEUTRAL | EXTENDABLE | ARM | STOPPING}
    digest = hashlib.sha1(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:8]
    al = config.active_learning
    suffix = "" if precision is None else "-" + precision_name(precision)
    return f"{config.task.name}-{al.initial_size}+{al.query_size}-{digest}{suffix}"


def precision_name(precision: dict[str, str]) -> str:
    """The resolved dtypes of `PRECISION_KEYS` in short, joined by ``_`` (``fp32_bf16_bf16``):
    the precision suffix of `protocol_id`."""
    return "_".join(_SHORT.get(precision[k], precision[k]) for k in PRECISION_KEYS)


def identity(flat: dict[str, Any]) -> dict[str, Any]:
    """`flat` (`flatten_config`) less the `ADDED_LATER` settings that hold the value runs
    had before the setting existed."""
    return {k: v for k, v in flat.items() if not (k in ADDED_LATER and v == ADDED_LATER[k])}


def result_changes(stored: ExperimentConfig, new: ExperimentConfig) -> list[str]:
    """Dotted keys whose change from `stored` to `new` would alter the results of a run.

    Result-neutral settings may change freely; extendable ones may grow, not shrink (a run
    cannot un-run a round).
    """
    a, b = flatten_config(stored), flatten_config(new)
    changed = []
    for key in a:
        if a[key] == b.get(key) or key in RESULT_NEUTRAL | STOPPING:
            continue
        if key in EXTENDABLE and (b[key] is None or (a[key] is not None and b[key] >= a[key])):
            continue  # more rounds, a larger budget, or no budget limit any more
        changed.append(key)
    return changed
