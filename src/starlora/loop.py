"""The STAR active-learning loop.

    initial labelled set (seeded random)
    for round k = 0 .. R-1:
        train     a constraint-LoRA adapter on everything labelled so far
        evaluate  it on the test split -> metrics.jsonl
        score     the unlabelled pool (adapter with MC dropout; base model once, cached)
        select    query_size ids with the acquisition strategy
        label     them (here: a simulated oracle that returns the gold answer)

Data walks one way: pool -> scores -> selection -> labels -> adapter -> metrics. Each phase
writes its outputs through `RunStore` before it is marked done, and each is deterministic given
the seed, so a run killed at any point and restarted ends exactly as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from starlora.acquisition import QueryStrategy, make_strategy
from starlora.config import ExperimentConfig, TaskConfig, flatten_config
from starlora.errors import ConfigError, DataError
from starlora.store import RunStore, write_json
from starlora.tasks import Example, Task, get_task, load_examples


def make_task(cfg: TaskConfig) -> Task:
    """The configured task; jsonl-only options are passed only to the jsonl task."""
    options = dict(prompt_style=cfg.prompt_style, template=cfg.template,
                   answer_prefix=cfg.answer_prefix)
    if cfg.name == "jsonl":
        options.update(choices=cfg.choices, answer_regex=cfg.answer_regex)
    elif cfg.choices or cfg.answer_regex:
        raise ConfigError(f"task.choices/answer_regex: only for the jsonl task, not {cfg.name!r}")
    return get_task(cfg.name, **options)


def _subset(examples: list[Example], size: int | None, seed: int) -> list[Example]:
    if size is None or size >= len(examples):
        return examples
    keep = np.sort(np.random.default_rng(seed).choice(len(examples), size, replace=False))
    return [examples[i] for i in keep]


def load_data(cfg: TaskConfig, task: Task) -> tuple[list[Example], list[Example]]:
    """(pool, test) for the configured task: generated, or read from the JSONL files, then
    cut to pool_size / test_size by a seeded random subset shared by every run."""
    splits = []
    for split, path, size, default in (("train", cfg.train, cfg.pool_size, 1000),
                                       ("test", cfg.test, cfg.test_size, 200)):
        generated = task.generate(split, size or default, cfg.subset_seed)
        if generated is not None:
            splits.append(generated)
            continue
        if path is None:
            raise ConfigError(
                f"task.{split}: required for task {cfg.name!r} "
                f"(a JSONL file, e.g. ../shared/data/{cfg.name}/{split}.jsonl)"
            )
        examples = load_examples(path, task, question_field=cfg.question_field,
                                 answer_field=cfg.answer_field, id_field=cfg.id_field,
                                 dedupe=cfg.dedupe)
        splits.append(_subset(examples, size, cfg.subset_seed + (split == "test")))
    return splits[0], splits[1]


def planned_rounds(config: ExperimentConfig) -> int:
    """Training rounds to run: `rounds`, fewer if `budget` is reached earlier."""
    al = config.active_learning
    if al.budget is None:
        return al.rounds
    return min(al.rounds, 1 + max(0, math.ceil((al.budget - al.initial_size) / al.query_size)))


def protocol_id(config: ExperimentConfig) -> str:
    """Names what makes runs comparable: everything but strategy, seed and run-time knobs."""
    d = config.model_dump(mode="json")
    d.pop("seed"), d.pop("output")
    d["active_learning"].pop("strategy")
    for section, key in (("scoring", "batch_size"), ("scoring", "max_tokens_per_batch"),
                         ("evaluation", "batch_size"), ("model", "device")):
        d[section].pop(key)
    digest = hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]
    al = config.active_learning
    return f"{config.task.name}-{al.initial_size}+{al.query_size}x{planned_rounds(config)}-{digest}"


def check_plan(config: ExperimentConfig, pool: Sequence[Example]) -> None:
    """Refuse, before any work, a protocol that the pool cannot serve."""
    al = config.active_learning
    if al.initial_size > len(pool):
        raise ConfigError(f"active_learning.initial_size: {al.initial_size} is larger than the "
                          f"pool ({len(pool)} examples)")
    need = al.initial_size + al.query_size * (planned_rounds(config) - 1)
    if al.budget is not None:
        need = min(need, al.budget)
    if need > len(pool) and al.on_exhausted == "error":
        raise ConfigError(
            f"active_learning.query_size: the protocol labels {need} examples but the pool has "
            f"{len(pool)}; lower rounds/query_size or set active_learning.on_exhausted: take_rest"
        )


class SimulatedOracle:
    """Labels by looking up the gold answer (the standard active-learning simulation)."""

    def __init__(self, pool: Sequence[Example]):
        self._answers = {ex.id: ex.answer for ex in pool}

    def label(self, ids: Sequence[str]) -> dict[str, str]:
        return {i: self._answers[i] for i in ids}


def _say(message: str) -> None:
    print(f"[starlora] {message}", file=sys.stderr, flush=True)


def _score_rows(
    model, tokenizer, task: Task, candidates: list[Example], strategy: QueryStrategy,
    config: ExperimentConfig, seed: int, progress: bool,
) -> list[dict]:
    """One row per candidate with the score columns the strategy needs."""
    from starlora.scoring import (
        BaseScoreCache,
        base_cache_key,
        default_score_cache_dir,
        score_base,
        score_examples,
    )

    rows = [{"id": ex.id} for ex in candidates]
    needs = set(strategy.needs)
    sc = config.scoring
    kwargs = dict(batch_size=sc.batch_size, max_tokens_per_batch=sc.max_tokens_per_batch,
                  max_length=config.training.max_length, progress=progress)
    full_measures = tuple(m for m in ("pe", "me") if m in needs)
    if full_measures:
        full = score_examples(model, tokenizer, task, candidates, measures=full_measures,
                              mc_passes=sc.mc_passes, model_dropout=sc.model_dropout, seed=seed,
                              desc="scoring pool (adapter, MC dropout)", **kwargs)
        for i, row in enumerate(rows):
            row.update({m: float(getattr(full, m)[i]) for m in full_measures})
    base_measures = tuple(m for m in ("pe", "me") if f"{m}_base" in needs)
    if base_measures:
        key = base_cache_key(config.model.name, task, measures=base_measures,
                             dtype=config.model.dtype, max_length=config.training.max_length)
        base = score_base(model, tokenizer, task, candidates, measures=base_measures,
                          cache=BaseScoreCache(default_score_cache_dir(), key),
                          desc="scoring pool (base model, cached)", **kwargs)
        base = base.select([ex.id for ex in candidates])
        for i, row in enumerate(rows):
            row.update({f"{m}_base": float(getattr(base, m)[i]) for m in base_measures})
    return rows


def run_experiment(config: ExperimentConfig, run_dir: str | Path, *, progress: bool = True) -> RunStore:
    """Run, or resume, the experiment `config` in `run_dir`. Returns the store."""
    from starlora.evaluation import evaluate
    from starlora.models import load_model
    from starlora.training import load_adapter, remove_adapter, save_adapter, train_adapter

    al, seed = config.active_learning, config.seed
    # everything that can be wrong with the input is checked before any work starts
    task = make_task(config.task)
    n_rounds = planned_rounds(config)
    strategy = make_strategy(al.strategy, n_queries=max(1, n_rounds - 1),
                             lambda_schedule=al.lambda_schedule, lambda_start=al.lambda_start,
                             lambda_end=al.lambda_end, normalize=al.normalize)
    pool, test = load_data(config.task, task)
    check_plan(config, pool)
    pool_hash = hashlib.sha1("\n".join(ex.id for ex in pool).encode()).hexdigest()

    store = RunStore.create_or_resume(run_dir, config)
    pool_file = store.root / "pool.json"
    if pool_file.is_file():
        if json.loads(pool_file.read_text())["sha1"] != pool_hash:
            raise DataError(str(config.task.train or f"task {config.task.name}"), None, None,
                            f"the pool differs from the one {run_dir} started with")
    else:
        write_json(pool_file, {"size": len(pool), "sha1": pool_hash})
    state = store.state()
    if state.get("finished") and state["round"] >= n_rounds - 1:
        _say(f"{run_dir}: already finished ({n_rounds} rounds)")
        return store

    _say(f"{run_dir}: {strategy}, task {task.name}, pool {len(pool)}, test {len(test)}, "
         f"{n_rounds} rounds" + (f", resuming at round {state['round']}" if state["phase"] else ""))
    loaded = load_model(config.model.name, device=config.model.device, dtype=config.model.dtype,
                        trust_remote_code=config.model.trust_remote_code)
    base_model, tokenizer = loaded.model, loaded.tokenizer
    oracle = SimulatedOracle(pool)
    by_id = {ex.id: ex for ex in pool}
    tracker = None
    if config.output.report_to:
        from accelerate import Accelerator

        tracker = Accelerator(log_with=config.output.report_to, project_dir=str(store.root))
        scalars = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                   for k, v in flatten_config(config).items()}
        tracker.init_trackers(Path(run_dir).name, config=scalars)

    if not store.labelled():
        rng = np.random.default_rng([seed, 0xA11])
        first = rng.choice(len(pool), al.initial_size, replace=False)
        ids = [pool[i].id for i in first]
        store.add_labels([{"id": i, "round": 0, "answer": a} for i, a in oracle.label(ids).items()])

    protocol = protocol_id(config)
    for k in range(store.state()["round"], n_rounds):
        labelled = store.labelled()
        labelled_ids = {r["id"] for r in labelled}
        train_set = [Example(r["id"], by_id[r["id"]].question, r["answer"]) for r in labelled]
        model = None
        if not store.done(k, "train"):
            _say(f"round {k}/{n_rounds - 1}: training on {len(train_set)} labelled examples")
            warm = store.adapter_dir(k - 1) if config.training.warm_start and k > 0 else None
            result = train_adapter(base_model, tokenizer, task, train_set, config.training,
                                   config.lora, seed=seed * 1000 + k, init_adapter=warm,
                                   progress=progress)
            model = result.model
            save_adapter(model, store.adapter_dir(k))
            store.write_round(k, "train.json", {
                "n_examples": len(train_set), "steps": result.steps, "seconds": result.seconds,
                "train_tokens": result.train_tokens, "final_loss": result.final_loss})
            store.set_state(k, "train")
        if config.output.keep_adapters == "last":
            store.prune_adapters(k)
        if model is None and not store.done(k, "label"):
            model = load_adapter(base_model, store.adapter_dir(k))

        if not store.done(k, "evaluate"):
            _say(f"round {k}/{n_rounds - 1}: evaluating on {len(test)} test examples")
            t0 = time.perf_counter()
            ev = evaluate(model, tokenizer, task, test, config.evaluation, progress=progress)
            seconds = store.read_round(k, "train.json")["seconds"] + time.perf_counter() - t0
            store.write_round(k, "predictions.jsonl", ev.predictions)
            store.write_round(k, "metrics.json", {"accuracy": ev.accuracy, "ece": ev.ece,
                                                  "ece_sequence": ev.ece_sequence,
                                                  "n": ev.n, "mode": ev.mode, "bins": ev.bins})
            line = {"round": k, "n_labelled": len(labelled), "accuracy": ev.accuracy,
                    "ece": ev.ece, "strategy": al.strategy, "seed": seed,
                    "seconds": round(seconds, 3), "task": task.name, "protocol": protocol}
            store.record_metrics(line)
            if tracker is not None:
                tracker.log({"accuracy": ev.accuracy, "ece": ev.ece,
                             "n_labelled": len(labelled)}, step=k)
            _say(f"round {k}: accuracy {ev.accuracy:.4f}, ece {ev.ece:.4f}, "
                 f"{len(labelled)} labelled")
            store.set_state(k, "evaluate", finished=k == n_rounds - 1)
        if k == n_rounds - 1:
            if model is not None:
                base_model = remove_adapter(model)
            break

        rng = np.random.default_rng([seed, k + 1])
        if not store.done(k, "score"):
            candidates = [ex for ex in pool if ex.id not in labelled_ids]
            if al.pool_subsample and al.pool_subsample < len(candidates):
                keep = np.sort(rng.choice(len(candidates), al.pool_subsample, replace=False))
                candidates = [candidates[i] for i in keep]
            if strategy.needs:
                _say(f"round {k}: scoring {len(candidates)} unlabelled examples")
            rows = _score_rows(model, tokenizer, task, candidates, strategy, config,
                               seed=seed * 1000 + k, progress=progress)
            store.write_round(k, "scores.jsonl", rows)
            store.set_state(k, "score")
        if not store.done(k, "select"):
            rows = store.read_round(k, "scores.jsonl")
            columns = {c: np.array([r[c] for r in rows], dtype=float) for c in strategy.needs}
            size = al.query_size
            if al.budget is not None:
                size = min(size, al.budget - len(labelled))
            selected = strategy.select([r["id"] for r in rows], columns, size, query_index=k,
                                       rng=rng, take_rest=al.on_exhausted == "take_rest")
            store.write_round(k, "selected.jsonl", [{"id": i, "rank": n} for n, i in enumerate(selected)])
            store.set_state(k, "select")
        if not store.done(k, "label"):
            selected = [r["id"] for r in store.read_round(k, "selected.jsonl")]
            new = [i for i in selected if i not in labelled_ids]  # idempotent on resume
            answers = oracle.label(new)
            store.add_labels([{"id": i, "round": k + 1, "answer": answers[i]} for i in new])
            store.set_state(k + 1, None)
        if model is not None:
            base_model = remove_adapter(model)

    if tracker is not None:
        tracker.end_training()
    _say(f"{run_dir}: finished")
    return store
