"""The STAR active-learning loop.

    initial labelled set (seeded random)
    for round k = 0 .. R-1:
        train     a constraint-LoRA adapter on everything labelled so far
        evaluate  it on the test split -> metrics.jsonl
        score     the unlabelled pool (adapter with MC dropout; base model once, cached)
        select    query_size ids with the acquisition strategy
        label     them (here: a simulated oracle that returns the gold answer)

Data walks one way: pool -> scores -> selection -> labels -> adapter -> metrics. Each phase is
one function below; it writes its outputs through `RunStore` before the phase is marked done,
and draws only from its own random stream (`starlora.protocol`), so a run killed at any point
and restarted ends exactly as an uninterrupted one.

Under several processes (``torchrun``/``accelerate launch``, `starlora.distributed`) every
process runs this loop: training is data-parallel, evaluation and scoring take a share each,
labelling generates a human query's drafts in shares, and only the main process writes the
run directory and selects (`COLLECTIVE` tells the phases apart). Whether a phase is done is
read by the main process and broadcast, so every process takes the same path; an error or a
pause on the main process stops them all.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from starlora import distributed as dist
from starlora.acquisition import QueryStrategy, make_strategy
from starlora.config import ExperimentConfig, flatten_config, load_config
from starlora.errors import StarloraError
from starlora.run import identity, oracle
from starlora.run.context import Run
from starlora.run.context import say as _say
from starlora.run.cuts import evaluation_cuts, scoring_cuts, training_cuts
from starlora.run.data import Data, check_plan, load_data, make_task, set_aside_stop_set
from starlora.run.embeddings import (
    EMBEDDING_COLUMNS,
    embedding_columns,
    ensure_embeddings,
    wants_embeddings,
)
from starlora.run.lock import hold_run
from starlora.run.pool_scores import check_scoring, score_rows
from starlora.run.protocol import PHASES, USED_UP, phase_seed, planned_rounds, protocol_id, stream
from starlora.run.store import RunPaths, RunStore
from starlora.stopping import parse_rule, stop_index, stop_signals
from starlora.tasks import Example, Task


# -- phases: each reads what earlier phases stored and writes its own outputs ----------------
def _train(run: Run, k: int) -> None:
    from starlora.adapters import save_adapter
    from starlora.training import train_adapter

    train_set = run.labelled_examples()
    run.say(k, f"training on {len(train_set)} labelled examples")
    training_cuts(run, k, train_set)
    cfg = run.config
    warm = run.store.adapter_dir(k - 1) if cfg.training.warm_start and k > 0 else None
    if warm is not None and not run.store.has_adapter(k - 1):
        raise StarloraError(f"{run.store.root}: training.warm_start continues from round "
                            f"{k - 1}'s adapter, which is not in {warm}: a warm-started run "
                            "resumes only with its adapters (output.keep_adapters keeps them)")
    result = train_adapter(run.base_model, run.tokenizer, run.task, train_set, cfg.training,
                           cfg.lora, seed=phase_seed(cfg.seed, k, "train"), init_adapter=warm,
                           progress=run.progress)
    run.model = result.model
    # every process holds the same adapter (or, under ZeRO-3, a share of it); one writes it
    save_adapter(run.model, run.store.adapter_dir(k), write=dist.is_main())
    if dist.is_main():
        run.store.write_round(k, "train.json", {
            "n_examples": len(train_set), "steps": result.steps, "seconds": result.seconds,
            "train_tokens": result.train_tokens, "final_loss": result.final_loss})


def _query_lambda(run: Run, k: int) -> float | None:
    """λ of the query that chose round `k`'s newest labels, as stored with its selection."""
    if k == 0:
        return None
    rows = run.store.read_round(k - 1, "selected.jsonl")
    return rows[0].get("lambda") if rows else None


def _evaluate(run: Run, k: int) -> None:
    from starlora.evaluation import evaluate

    test, cfg = run.data.test, run.config
    run.say(k, f"evaluating on {len(test)} test examples")
    t0 = time.perf_counter()
    ev = evaluate(run.adapted(k), run.tokenizer, run.task, test, cfg.evaluation,
                  progress=run.progress, seed=phase_seed(cfg.seed, k, "evaluate"),
                  max_length=cfg.training.max_length)  # prompts cut as in training
    stop = None
    if run.data.stop:  # the stop set: answered, never graded (its answers are not read)
        run.say(k, f"answering the stop set ({len(run.data.stop)} unlabelled examples)")
        stop = evaluate(run.adapted(k), run.tokenizer, run.task, run.data.stop,
                        cfg.evaluation.model_copy(update={"samples": 0}), progress=run.progress,
                        max_length=cfg.training.max_length)
    evaluation_cuts(run, k, [*test, *run.data.stop])
    if not dist.is_main():  # every process has the metrics; one writes them
        return
    seconds = run.store.read_round(k, "train.json")["seconds"] + time.perf_counter() - t0
    run.store.write_round(k, "predictions.jsonl", ev.predictions)
    signals = {name: {m: (None if isinstance(v, float) and np.isnan(v) else v)
                      for m, v in found.items() if m != "bins"}
               for name, found in ev.signals.items()}
    run.store.write_round(k, "metrics.json", {"accuracy": ev.accuracy, "ece": ev.ece,
                                              "ece_sequence": ev.ece_sequence, "n": ev.n,
                                              "mode": ev.mode, "bins": ev.bins,
                                              "signals": {name: {**signals[name],
                                                                 "bins": found["bins"]}
                                                          for name, found in ev.signals.items()}})
    stopping = {}
    if stop is not None:
        rows = [{k_: v for k_, v in p.items() if k_ not in ("gold", "correct")}
                for p in stop.predictions]
        run.store.write_round(k, "stop.jsonl", rows)
        before = run.store.read_round(k - 1, "stop.jsonl") if k > 0 else None
        stopping = stop_signals(before, rows, choice=stop.mode == "choice")
    n_labelled = len(run.store.labelled())
    run.store.record_metrics({
        "round": k, "n_labelled": n_labelled, "accuracy": ev.accuracy, "ece": ev.ece,
        "lambda": _query_lambda(run, k), "strategy": cfg.active_learning.strategy,
        "seed": cfg.seed, "seconds": round(seconds, 3), "task": run.task.name,
        "protocol": protocol_id(cfg, run.precision), "signals": signals, **stopping})
    if run.tracker is not None:
        run.tracker.log({"accuracy": ev.accuracy, "ece": ev.ece, "n_labelled": n_labelled},
                        step=k)
    said = "".join(f", {name} {v:.4f}" for name, v in stopping.items() if v is not None)
    _say(f"round {k}: accuracy {ev.accuracy:.4f}, ece {ev.ece:.4f}, {n_labelled} labelled"
         + said)


def stopped_at(config: ExperimentConfig, metrics: list[dict]) -> int | None:
    """The round after which ``active_learning.stop_when`` ends the run, judged on
    `metrics` (metrics.jsonl rows), or None (no rule, or it has not held)."""
    rule = parse_rule(config.active_learning.stop_when)
    if rule is None:
        return None
    rows = sorted(metrics, key=lambda r: r["round"])
    found = stop_index(rule, [r.get(rule.field) for r in rows])
    return None if found is None else rows[found]["round"]


def _unlabelled(run: Run) -> list[Example]:
    """The pool examples not yet labelled, in pool order: empty when the pool is used up."""
    labelled = {r["id"] for r in run.store.labelled()}
    return [ex for ex in run.data.pool if ex.id not in labelled]


def _candidates(run: Run, k: int) -> list[Example]:
    """The unlabelled pool, or its seeded subsample of `pool_subsample` examples."""
    candidates = _unlabelled(run)
    size = run.config.active_learning.pool_subsample
    if size and size < len(candidates):
        keep = np.sort(stream(run.config.seed, k, "subsample").choice(len(candidates), size,
                                                                      replace=False))
        candidates = [candidates[i] for i in keep]
    return candidates


def _score(run: Run, k: int) -> None:
    candidates = _candidates(run, k)
    if wants_embeddings(run.strategy.needs):  # once per run: the base model's, adapter off
        ensure_embeddings(run, run.model if run.model is not None else run.base_model)
    scored = [c for c in run.strategy.needs if c not in EMBEDDING_COLUMNS]
    if scored:
        run.say(k, f"scoring {len(candidates)} unlabelled examples")
    if scored or wants_embeddings(run.strategy.needs):
        scoring_cuts(run, k, candidates, scored=bool(scored))
    rows = score_rows(run, candidates, seed=phase_seed(run.config.seed, k, "score"),
                      model=run.adapted(k) if scored else None)
    if dist.is_main():  # the rows of every process's share, gathered
        run.store.write_round(k, "scores.jsonl", rows)


def _select(run: Run, k: int) -> None:
    rows = run.store.read_round(k, "scores.jsonl")
    needs = run.strategy.needs
    columns = {c: np.array([r[c] for r in rows], dtype=float) for c in needs
               if c not in EMBEDDING_COLUMNS}
    columns |= embedding_columns(run, [r["id"] for r in rows], needs)
    al = run.config.active_learning
    size = al.query_size
    if al.budget is not None:
        size = min(size, al.budget - len(run.store.labelled()))
    selected = run.strategy.select_rows(
        [r["id"] for r in rows], columns, size, query_index=k,
        rng=stream(run.config.seed, k, "select"), take_rest=al.on_exhausted == "take_rest")
    run.store.write_round(k, "selected.jsonl", selected)


def _label(run: Run, k: int) -> None:
    # every process: a human query's drafts may need a forward pass on each (ZeRO-3)
    oracle.label_collectively(run, k + 1, lambda: run.store.read_round(k, "selected.jsonl"))


PHASE_FUNCTIONS: dict[str, Callable[[Run, int], None]] = {
    "train": _train, "evaluate": _evaluate, "score": _score, "select": _select, "label": _label,
}
#: phases every process runs (each its part); the others run on the main process alone
COLLECTIVE = frozenset({"train", "evaluate", "score", "label"})


def _start_tracker(config: ExperimentConfig, store: RunStore) -> Any:
    from accelerate import Accelerator

    tracker = Accelerator(log_with=config.output.report_to, project_dir=str(store.root))
    scalars = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
               for k, v in flatten_config(config).items()}
    tracker.init_trackers(store.root.name, config=scalars)
    return tracker


def config_strategy(config: ExperimentConfig, n_rounds: int) -> QueryStrategy:
    """The strategy `config` names, with its ``active_learning`` settings (λ over the
    `n_rounds` - 1 queries of a run of `n_rounds` training rounds)."""
    al = config.active_learning
    return make_strategy(al.strategy, n_queries=max(1, n_rounds - 1),
                         lambda_schedule=al.lambda_schedule, lambda_start=al.lambda_start,
                         lambda_end=al.lambda_end, normalize=al.normalize,
                         diversity=al.diversity, diversity_pool=al.diversity_pool)


def checked_inputs(config: ExperimentConfig) -> tuple[Task, Data, int, QueryStrategy]:
    """(task, data, planned rounds, strategy) of `config`, after every check of the input
    that needs no model (config, data files, the plan the pool must serve, the scoring the
    strategy needs, the oracle): what a run checks before any work, and ``starlora run
    --check`` alone."""
    task = make_task(config.task)
    data = set_aside_stop_set(load_data(config.task, task),
                              config.active_learning.stop_set, config.seed)
    check_plan(config, data.pool, data.labelled, data.dropped)
    n_rounds = planned_rounds(config, len(data.labelled) or None)
    strategy = config_strategy(config, n_rounds)
    check_scoring(config, strategy)
    oracle.check_oracle(config, data.pool, str(config.task.train or f"task {task.name}"))
    return task, data, n_rounds, strategy


def run_experiment(config: ExperimentConfig, run_dir: str | Path, *, progress: bool = True,
                   allow_precision_change: bool = False) -> RunStore:
    """Run, or resume, the experiment `config` in `run_dir`. Returns the store; with a human
    oracle the run may stop early, waiting for answers (``store.pending()`` is then not
    empty). A resume is refused when its data differ from the run's, or when its precision
    would (`starlora.run.identity`), unless `allow_precision_change`."""
    from starlora.adapters import lora_note
    from starlora.models import load_model

    task, data, n_rounds, strategy = checked_inputs(config)
    pool_hash = hashlib.sha1("\n".join(ex.id for ex in data.pool).encode()).hexdigest()
    contents = identity.data_hashes(config, data.pool, data.test, data.labelled, data.stop)

    dist.setup(cpu=config.model.device == "cpu" or None)
    with contextlib.ExitStack() as held:  # the run-wide lock, on the main process
        dist.on_main(lambda: held.enter_context(hold_run(run_dir)))
        fresh = dist.on_main(lambda: not RunPaths(run_dir).config.is_file())

        def open_store() -> dict:
            paths = RunPaths(run_dir)
            stored = load_config(paths.config, stored=True) if paths.config.is_file() else config
            store = RunStore.create_or_resume(run_dir, config, save=False)
            store.check_pool(len(data.pool), pool_hash,
                             str(config.task.train or f"task {task.name}"), config.task.labelled)
            identity.check_data(store, contents)
            plan = identity.first_plan(store, planned_rounds(stored, len(data.labelled) or None))
            return {**store.state(), "at": store.current_round(), "open": store.open_query(),
                    "plan": plan}

        state = dist.on_main(open_store)  # only the main process writes the run directory
        store = RunStore(run_dir, config)
        if state["plan"] != n_rounds:  # an extended run keeps the λ schedule it started with
            strategy = config_strategy(config, state["plan"])
        if state.get("finished") and state["round"] >= n_rounds - 1:
            _say(f"{run_dir}: already finished ({n_rounds} rounds)")
            return store
        if state.get("finished") and state.get("stopped") == USED_UP:
            _say(f"{run_dir}: already finished (the pool was used up in round {state['round']})")
            return store
        if state.get("finished") and dist.agree(lambda: stopped_at(config, store.metrics())
                                                is not None):
            _say(f"{run_dir}: already finished "
                 f"(active_learning.stop_when: {config.active_learning.stop_when})")
            return store

        overlap = f" ({data.dropped} pool records that repeat a test record dropped)" \
            if data.dropped else ""
        resuming = bool(state["phase"] or state["open"] is not None)
        _say(f"{run_dir}: {strategy}, task {task.name}, pool {len(data.pool)}{overlap}, "
             f"test {len(data.test)}, {n_rounds} rounds"
             + (f", resuming at round {state['at']}" if resuming else ""))
        try:  # a start that fails here, before any work, leaves no run behind
            loaded = load_model(**config.model.model_dump())
            for note in [task.raw_prompt_note(loaded.tokenizer), lora_note(loaded.model, config)]:
                if note and not resuming:  # once, as the run starts
                    _say(f"note: {note}")
            precision = identity.resolved_precision(config, loaded.model)
            run = Run(config, store, task, strategy, data, n_rounds, progress and dist.is_main(),
                      loaded.model, loaded.tokenizer, loaded.fingerprint,
                      by_id={ex.id: ex for ex in [*data.pool, *data.labelled]},
                      precision=dist.on_main(lambda: identity.check_precision(
                          store, precision, state, allow_change=allow_precision_change)))
            run.check_room()  # a generation that cannot fit the model: an error before any work
            dist.on_main(run.check_labels)  # so is a labelled.jsonl with an id not in the data
        except BaseException as e:  # an error or Ctrl-C before any work: no run is left
            if fresh and (isinstance(e, StarloraError) or dist.world_size() == 1):
                dist.on_main(store.undo_start)
            raise
        dist.on_main(store.save_config)  # its changes, now that the resume is accepted
        for check in (lambda: identity.check_weights(store, loaded.fingerprint, state),
                      lambda: identity.check_machine(
                          store, identity.machine(str(loaded.model.device)), state)):
            if changed := dist.on_main(check):
                _say(changed)
        if config.output.report_to and dist.is_main():
            run.tracker = _start_tracker(config, store)
        try:
            _rounds(run)
        except oracle.Paused as paused:
            _say(f"{run_dir}: paused: {paused}")
            return store
        except KeyboardInterrupt:  # before its first phase: as a start that failed
            if fresh and dist.world_size() == 1:
                store.undo_start()
            raise
        finally:
            if run.tracker is not None:
                run.tracker.end_training()
        _say(f"{run_dir}: finished")
        return store


def _adapter_lost(store: RunStore, k: int) -> bool:
    """Whether round `k` trained, still has to evaluate or score with its adapter, and the
    adapter is gone (a run directory committed or copied without its ``adapter/`` folders).
    Until its score phase is done, ``labelled.jsonl`` holds exactly what round `k` trained on,
    so training again from the round's seed gives the adapter back, as a resume after a kill
    during training would; after it, the adapter is not needed."""
    return (store.done(k, "train") and not store.done(k, "score")
            and not store.has_adapter(k))


def _rounds(run: Run) -> None:
    """Every phase of every round that is not done yet (see `starlora.run.protocol.PHASES`)."""
    from starlora.adapters import remove_adapter

    store, config, n_rounds = run.store, run.config, run.n_rounds
    # the main process reads what it wrote and says; every process follows (`dist.agree`)
    if dist.agree(lambda: not store.labelled() or store.open_query() == 0):
        oracle.initial_labels(run)  # every process (drafts); the main process writes
    for k in range(dist.agree(lambda: store.state()["round"]), n_rounds):
        last = k == n_rounds - 1
        if dist.agree(lambda: _adapter_lost(store, k)):  # noqa: B023 - called at once
            _say(f"round {k}: its adapter is not in the run directory (copied or committed "
                 "without adapters?): training it again, from the same seed")
            _train(run, k)
        for phase in PHASES:
            if last and PHASES.index(phase) > PHASES.index("evaluate"):
                break  # the last round trains and evaluates; there is nothing left to query
            if dist.agree(lambda: not store.done(k, phase)):  # noqa: B023 - called at once
                if phase in COLLECTIVE:
                    PHASE_FUNCTIONS[phase](run, k)
                else:
                    dist.on_main(lambda: PHASE_FUNCTIONS[phase](run, k))  # noqa: B023
                if dist.is_main() and phase == "label":
                    store.set_state(k + 1, None)
                elif dist.is_main():
                    store.set_state(k, phase, finished=last and phase == "evaluate")
            if phase == "evaluate" and not last and dist.agree(lambda: not _unlabelled(run)):
                dist.on_main(lambda: store.set_state(k, "evaluate", finished=True,  # noqa: B023
                                                     stopped=USED_UP))
                _say(f"round {k}: the pool is used up (active_learning.on_exhausted: "
                     "take_rest): the run ends here")
                return
            if phase == "evaluate" and not last and dist.agree(
                    lambda: stopped_at(config, store.metrics()) is not None):
                dist.on_main(lambda: store.set_state(k, "evaluate", finished=True,  # noqa: B023
                                                     stopped=config.active_learning.stop_when))
                _say(f"round {k}: active_learning.stop_when ({config.active_learning.stop_when})"
                     " holds: the run ends here")
                return
            if phase == "train" and config.output.keep_adapters == "last" and dist.is_main():
                store.prune_adapters(k)
        if run.model is not None:
            run.base_model, run.model = remove_adapter(run.model), None
