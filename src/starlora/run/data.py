"""The examples of a run: the task it names, its pool and test split, and whether the pool
can serve the protocol. Everything here runs before any model is loaded, so bad input fails
fast."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from starlora.config import ExperimentConfig, TaskConfig
from starlora.datafiles import load_examples
from starlora.errors import ConfigError, DataError, Problems
from starlora.run.protocol import planned_rounds, stream
from starlora.seeds import subset_stream
from starlora.stopping import parse_rule
from starlora.tasks import Example, Task, get_task


def make_task(cfg: TaskConfig) -> Task:
    """The configured task; jsonl-only options are passed only to the jsonl task."""
    options = dict(prompt_style=cfg.prompt_style, template=cfg.template,
                   answer_prefix=cfg.answer_prefix)
    if cfg.name == "jsonl":
        options.update(choices=cfg.choices, answer_regex=cfg.answer_regex)
    elif cfg.choices or cfg.answer_regex:
        raise ConfigError(f"task.choices/answer_regex: only for the jsonl task, not {cfg.name!r}")
    return get_task(cfg.name, **options)


@dataclass
class Data:
    """The examples of a run: the pool (answers optional), the test split, the user's own
    labelled examples (`task.labelled`, not in the pool); `dropped` pool records repeated a
    test record; `stop`: the stop set (`set_aside_stop_set`), taken out of the pool."""

    pool: list[Example]
    test: list[Example]
    dropped: int = 0
    labelled: list[Example] = field(default_factory=list)
    stop: list[Example] = field(default_factory=list)


def set_aside_stop_set(data: Data, size: int, seed: int) -> Data:
    """`data` with `size` pool examples moved to ``data.stop`` (drawn by the run's
    ``stop_set`` stream, in pool order, their answers dropped: the stop set is never labelled
    and its answers are never read); `data` itself when `size` is 0. ConfigError when the
    pool has no more than `size` examples."""
    if not size:
        return data
    if size >= len(data.pool):
        raise ConfigError(f"active_learning.stop_set: {size} is not smaller than the pool "
                          f"({len(data.pool)} examples)")
    chosen = set(stream(seed, 0, "stop_set").choice(len(data.pool), size, replace=False).tolist())
    stop = [Example(ex.id, ex.question, "", ex.meta) for i, ex in enumerate(data.pool)
            if i in chosen]
    pool = [ex for i, ex in enumerate(data.pool) if i not in chosen]
    return Data(pool, data.test, data.dropped, data.labelled, stop)


def _subset(examples: list[Example], size: int | None, subset_seed: int,
            split: str) -> list[Example]:
    """`size` of `examples`, drawn from `split`'s subset stream (`starlora.seeds`)."""
    if size is None or size >= len(examples):
        return examples
    rng = subset_stream(subset_seed, split)
    keep = np.sort(rng.choice(len(examples), size, replace=False))
    return [examples[i] for i in keep]


def _read(cfg: TaskConfig, task: Task, split: str, path: str | None, size: int | None,
          default: int) -> list[Example]:
    generated = task.generate(split, size or default, cfg.subset_seed)
    if generated is not None:
        return generated
    if path is None:
        what = "the pool: records with a question" if split == "train" else \
            "the test set: records with a question and its answer"
        default = " (task.name's default)" if cfg.name == TaskConfig().name else ""
        raise ConfigError(f"task.{split}: required for task {cfg.name!r}{default} ({what}; a "
                          ".jsonl, .csv or .parquet file, or hf:<dataset>[@<config>]:<split>)")
    return load_examples(path, task, question_field=cfg.question_field,
                         answer_field=cfg.answer_field, id_field=cfg.id_field, dedupe=cfg.dedupe,
                         require_answer=split != "train",
                         role="pool" if split == "train" else "test")


def load_data(cfg: TaskConfig, task: Task) -> Data:
    """Pool and test examples: generated, or read from the files. The test set is cut to
    `test_size` first; pool records that repeat a test record (`Task.content_key`) are then
    dropped (`drop_test_overlap`), and the pool is cut to `pool_size`. Subsets are seeded by
    `subset_seed` and shared by every run."""
    test = _read(cfg, task, "test", cfg.test, cfg.test_size, 200)
    test = _subset(test, cfg.test_size, cfg.subset_seed, "test")
    pool = _read(cfg, task, "train", cfg.train, cfg.pool_size, 1000)
    dropped = 0
    if cfg.drop_test_overlap:
        pool, dropped = drop_test_overlap(pool, test, task)
    labelled = []
    if cfg.labelled is not None:
        labelled = load_examples(cfg.labelled, task, question_field=cfg.question_field,
                                 answer_field=cfg.answer_field, id_field=cfg.id_field,
                                 role="labelled")
        if cfg.drop_test_overlap:
            _refuse_test_items(labelled, test, task, cfg.labelled)
        pool = _without(pool, labelled, cfg.labelled, task)
    return Data(_subset(pool, cfg.pool_size, cfg.subset_seed, "pool"), test, dropped, labelled)


def drop_test_overlap(pool: list[Example], test: list[Example],
                      task: Task) -> tuple[list[Example], int]:
    """`pool` less the records that repeat a `test` record (`Task.content_key`), and how many
    were dropped. Linear: one set of the test keys, one key per pool record."""
    seen = {task.content_key(ex) for ex in test}
    kept = [ex for ex in pool if task.content_key(ex) not in seen]
    return kept, len(pool) - len(kept)


def _line(ex: Example) -> int:
    """The line of its file a loaded record came from (``meta["source"]``: ``path:line``)."""
    return int(ex.meta["source"].rsplit(":", 1)[1])


def _refuse_test_items(labelled: list[Example], test: list[Example], task: Task,
                       source: str) -> None:
    """A DataError for each labelled record that repeats a test record (`Task.content_key`):
    training on it would grade the model on what it was taught. Checked, like the pool's
    overlap, unless ``task.drop_test_overlap`` is off."""
    test_ids = {task.content_key(ex): ex.id for ex in test}
    problems = Problems("labelled")
    for ex in labelled:
        if (twin := test_ids.get(task.content_key(ex))) is not None:
            problems.add(DataError(source, _line(ex), "question",
                                   f"repeats test record {twin!r}: remove it from this file "
                                   "(or set task.drop_test_overlap: false)"))
    problems.raise_if_any()


def _without(pool: list[Example], labelled: list[Example], source: str,
             task: Task) -> list[Example]:
    """The pool less the records the user labelled already: the same id, or the same item
    under another id (`Task.content_key`; e.g. ids numbered by line in two files cut from one
    source); an id shared by two different questions is an error."""
    by_id = {ex.id: ex for ex in pool}
    problems = Problems("labelled")
    for ex in labelled:
        if ex.id in by_id and by_id[ex.id].question != ex.question:
            problems.add(DataError(source, _line(ex), "id",
                                   f"{ex.id!r} names another question in the pool"))
    problems.raise_if_any()
    ids = {ex.id for ex in labelled}
    keys = {task.content_key(ex) for ex in labelled}
    return [ex for ex in pool if ex.id not in ids and task.content_key(ex) not in keys]


def check_plan(config: ExperimentConfig, pool: Sequence[Example],
               labelled: Sequence[Example] = (), dropped: int = 0) -> None:
    """Refuse, before any work, a protocol that the pool cannot serve, or whose initial
    labelled set is larger than its budget (`labelled`: the user's `task.labelled` examples,
    which replace the `initial_size` draw; `dropped`: the pool records that repeated a test
    record, named where the pool is too small)."""
    size = f"{len(pool)} examples" + (
        f"; {dropped} records repeated a test record and were dropped: task.drop_test_overlap"
        if dropped else "")
    al = config.active_learning
    if parse_rule(al.stop_when) is not None and not al.stop_set:
        raise ConfigError(f"active_learning.stop_when: {al.stop_when!r} reads the stop set; "
                          "set active_learning.stop_set to a number of pool items (e.g. 200)")
    n_initial = len(labelled) or al.initial_size
    if al.budget is not None and n_initial > al.budget:
        what = f"task.labelled holds {n_initial} labels" if labelled else \
            f"active_learning.initial_size is {n_initial}"
        raise ConfigError(f"active_learning.budget: {al.budget} labels, but {what} before "
                          "the first query; raise the budget")
    if not labelled and al.initial_size > len(pool):
        raise ConfigError(f"active_learning.initial_size: {al.initial_size} is larger than the "
                          f"pool ({size})")
    if al.pool_subsample is not None and al.pool_subsample < al.query_size \
            and al.on_exhausted == "error":  # take_rest: each query takes the whole subsample
        raise ConfigError(f"active_learning.pool_subsample: {al.pool_subsample} is smaller than "
                          f"active_learning.query_size {al.query_size}: a query picks among the "
                          "scored subsample; raise it, or lower query_size")
    n_rounds = planned_rounds(config, len(labelled) or None)
    need = (0 if labelled else al.initial_size) + al.query_size * (n_rounds - 1)
    if al.budget is not None:
        need = min(need, al.budget - (n_initial if labelled else 0))
    if need > len(pool) and al.on_exhausted == "error":
        raise ConfigError(
            f"active_learning.query_size: the protocol labels {need} examples but the pool has "
            f"{size}; lower rounds/query_size or set active_learning.on_exhausted: take_rest"
        )


def describe_plan(config: ExperimentConfig, data: Data, n_rounds: int) -> list[str]:
    """What a run of `config` on `data` will do, in a few lines (``starlora run --check``):
    the examples, the strategy and oracle, the labels round by round, the model."""
    al, n_labelled = config.active_learning, len(data.labelled)
    answered = sum(ex.answer is not None for ex in data.pool)
    start = f"{n_labelled} labels of task.labelled" if n_labelled else f"{al.initial_size} labels"
    total = (n_labelled or al.initial_size) + al.query_size * (n_rounds - 1)
    if al.budget is not None:
        total = min(total, al.budget)  # the last query is cut to fit the budget
    if total > n_labelled + len(data.pool):  # take_rest (check_plan refuses it otherwise)
        total = n_labelled + len(data.pool)
        n_rounds = min(n_rounds, 1 + math.ceil((len(data.pool) - (0 if n_labelled else
                                                                  al.initial_size))
                                               / al.query_size))
    stop = f", a stop set of {len(data.stop)}" if data.stop else ""
    return [f"task:     {config.task.name}: pool {len(data.pool)} ({answered} with answers"
            f"{stop}), test {len(data.test)}",
            f"strategy: {al.strategy}, oracle {al.oracle}, scoring {config.scoring.answers} "
            "answers",
            f"labels:   {start}, then {al.query_size} a round: {n_rounds} rounds, {total} labels",
            f"model:    {config.model.name} (not loaded by --check)"]
