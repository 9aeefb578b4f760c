"""Where a run stands, for `starlora status` and `RunStore.status`: one dict, its keys below."""

from __future__ import annotations

from typing import Any

from starlora.run.protocol import USED_UP, planned_rounds
from starlora.run.store import RunStore, resume_command


def run_status(store: RunStore) -> dict[str, Any]:
    """The run in `store`, as a JSON-ready dict (``starlora status --json`` prints it):

    * ``round`` (the current round), ``rounds`` (the rounds the run plans: `rounds`, fewer
      when `budget` is reached first; `starlora.run.protocol.planned_rounds`), ``phase``
      (the last phase done, ``"starting"``, ``"waiting for labels"``, ``"answered: the run
      goes on when resumed"`` or ``"finished"``);
    * ``n_labelled``, ``n_unlabelled`` (pool examples left; None before the pool is
      recorded), ``pending`` (queries waiting for people's answers);
    * ``strategy``, ``seed``, ``task``;
    * ``last_metrics``: the last line of metrics.jsonl (None before round 0 is evaluated);
      ``adapter``: that round's adapter folder, None when it is gone;
    * ``resume``: the command that resumes the run (None once finished);
    * ``stop_when`` (the rule), ``stopped_at`` (the round the rule held after, or None),
      ``stop_signals``: per round ``{"round", "stop_agreement", "stop_uncertainty"}``;
      ``pool_used_up``: the run ended when its pool was used up (`USED_UP`).
    """
    state, al = store.state(), store.config.active_learning
    labelled, metrics, pool_size = store.labelled(), store.metrics(), store.pool_size()
    pending = store.pending()
    finished = bool(state.get("finished"))
    phase = "finished" if finished else (state["phase"] or "starting")
    if not pending and not finished and store.open_query() is not None:
        phase = "answered: the run goes on when resumed"
    last = metrics[-1]["round"] if metrics else None  # its adapter, unless it is gone
    adapter = store.adapter_dir(last) if last is not None and store.has_adapter(last) else None
    return {
        "round": store.current_round(),
        "rounds": planned_rounds(store.config, sum(r.get("round") == 0 for r in labelled) or None),
        "phase": "waiting for labels" if pending else phase,
        "n_labelled": len(labelled),
        # labels from task.labelled are not pool records (the pool excludes them)
        "n_unlabelled": None if pool_size is None else pool_size - sum(
            not str(r.get("source", "")).startswith("file:") for r in labelled),
        "pending": len(pending),
        "strategy": al.strategy,
        "seed": store.config.seed,
        "task": store.config.task.name,
        "last_metrics": metrics[-1] if metrics else None,
        "adapter": str(adapter) if adapter else None,
        "resume": None if finished else resume_command(store.root),
        # the label-free stopping signals per round (`starlora.stopping`) and the rule
        "stop_when": al.stop_when,
        "stopped_at": state.get("round") if state.get("stopped") not in (None, USED_UP)
        else None,
        "pool_used_up": state.get("stopped") == USED_UP,
        "stop_signals": [{k: m.get(k) for k in ("round", "stop_agreement",
                                                "stop_uncertainty")} for m in metrics],
    }
