"""Who answers the queries: the simulated oracle (the pool's gold answers) or people.

With ``active_learning.oracle: human`` a query is written to ``queries/<r>.jsonl`` (r: the
round whose training first uses its answers) with, per example, the prompt as the model sees
it, the model's own answer as a draft and the uncertainty that chose it. The run then stops
(`Paused`) until every query has an answer (`starlora import`, `starlora annotate`); the
next ``starlora run`` closes the query under the run's lock and goes on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlora.errors import ConfigError
from starlora.tasks import Example

if TYPE_CHECKING:  # the loop's shared state; imported for type hints only
    from starlora.run.loop import Run


class Paused(Exception):  # noqa: N818 - a state the run stops in, not an error
    """The run waits for people to answer `pending` queries of label round `label_round`."""

    def __init__(self, run_dir: Path, pending: int, label_round: int):
        self.run_dir, self.pending, self.label_round = run_dir, pending, label_round
        super().__init__(
            f"{pending} queries wait for answers: starlora export {run_dir} --format csv "
            f"--out queries.csv, then starlora import {run_dir} queries.csv "
            f"(or starlora annotate {run_dir}), then run this command again"
        )

    def __reduce__(self) -> tuple:  # picklable: the main process hands it to the others
        return Paused, (self.run_dir, self.pending, self.label_round)


class SimulatedOracle:
    """Labels by looking up the gold answer (the standard active-learning simulation)."""

    def __init__(self, pool: Sequence[Example]):
        self._answers = {ex.id: ex.answer for ex in pool}

    def label(self, ids: Sequence[str]) -> dict[str, str]:
        return {i: self._answers[i] for i in ids}


def check_oracle(config: Any, pool: Sequence[Example], source: str) -> None:
    """Refuse, before any work, a simulated oracle or gold scoring on a pool without answers."""
    missing = sum(ex.answer is None for ex in pool)
    if not missing:
        return
    if config.active_learning.oracle == "simulated":
        raise ConfigError(
            f"active_learning.oracle: {missing} of {len(pool)} pool records in {source} have "
            "no answer, so a simulated oracle cannot label them; set active_learning.oracle: "
            "human (people answer the queries) or give the pool its answers"
        )
    if config.scoring.answers == "gold":
        raise ConfigError(
            f"scoring.answers: gold scores the pool's answers, but {missing} pool records in "
            f"{source} have none; set scoring.answers: generated"
        )


def label(run: Run, label_round: int, selected: list[dict]) -> None:
    """Label the `selected` rows (``{"id", "utility"?}``, best first) for `label_round`: from
    the pool's gold answers, or by asking people (may raise `Paused`)."""
    store = run.store
    if run.config.active_learning.oracle == "simulated":
        have = {r["id"] for r in store.labelled()}
        new = [r for r in selected if r["id"] not in have]  # idempotent on resume
        answers = SimulatedOracle(run.data.pool).label([r["id"] for r in new])
        store.add_labels([{"id": i, "round": label_round, "answer": a, "source": "simulated"}
                          for i, a in answers.items()])
        return
    if not store.paths.queries(label_round).is_file():
        store.write_queries(label_round, _queries(run, label_round, selected))
    if not store.close_query(label_round):
        raise Paused(store.root, len(store.pending()), label_round)


def _queries(run: Run, label_round: int, selected: list[dict]) -> list[dict]:
    """The rows of a human query: id, question, prompt, draft, uncertainty, round."""
    drafts = _drafts(run, label_round, [r["id"] for r in selected])
    rows = []
    for r in selected:
        ex = run.by_id[r["id"]]
        rows.append({"id": ex.id, "question": ex.question,
                     "prompt": run.task.prompt(ex, run.tokenizer), "draft": drafts[ex.id],
                     "uncertainty": r.get("utility"), "round": label_round})
    return rows


def _drafts(run: Run, label_round: int, ids: list[str]) -> dict[str, str]:
    """The model's answer to each id: from the round's scores when scoring generated it,
    else generated now (greedy) by the latest adapter, or the base model for round 0."""
    from starlora.generation import generate

    k = label_round - 1
    known: dict[str, str] = {}
    if k >= 0 and run.store.paths.round_file(k, "scores.jsonl").is_file():
        known = {r["id"]: r["answer"] for r in run.store.read_round(k, "scores.jsonl")
                 if "answer" in r}
    missing = [i for i in ids if i not in known]
    if missing:
        model = run.adapted(k) if k >= 0 else run.base_model
        prompts = [run.prompt_ids(run.by_id[i]) for i in missing]
        out = generate(model, run.tokenizer, prompts, max_new_tokens=run.max_new_tokens,
                       batch_size=run.config.evaluation.batch_size, progress=run.progress,
                       desc="drafting answers")
        known.update(zip(missing, (t.strip() for t in out.texts)))
    return {i: known[i] for i in ids}


def initial_labels(run: Run) -> None:
    """Round 0's labelled set: the user's `task.labelled` file, or `initial_size` pool
    examples drawn from the run's "initial" stream (labelled by the oracle)."""
    if run.data.labelled:
        name = Path(run.config.task.labelled).name
        run.store.add_labels([{"id": ex.id, "round": 0, "answer": ex.answer,
                               "source": f"file:{name}"} for ex in run.data.labelled])
        return
    from starlora.run.protocol import stream

    pool, size = run.data.pool, run.config.active_learning.initial_size
    first = stream(run.config.seed, 0, "initial").choice(len(pool), size, replace=False)
    label(run, 0, [{"id": pool[i].id, "utility": None} for i in first])
