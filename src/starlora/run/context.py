"""`Run`: everything the phases of a run share (its config, store, task, strategy, data,
models). The loop (`starlora.run.loop`) builds one; the phases in `loop`, `oracle`,
`pool_scores` and `embeddings` take it. It lives in a module of its own so that they import
it without importing the loop, which imports them."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from starlora import distributed as dist
from starlora.acquisition import QueryStrategy
from starlora.config import ExperimentConfig
from starlora.errors import DataError
from starlora.io import read_records
from starlora.run.data import Data
from starlora.run.store import RunStore
from starlora.tasks import Example, Task


def say(message: str) -> None:
    """`message` on stderr, from the main process only."""
    if dist.is_main():
        print(f"[starlora] {message}", file=sys.stderr, flush=True)


@dataclass
class Run:
    """Everything the phases of a run share. `model` is the current round's peft model (base
    + adapter) while it is in memory, None otherwise."""

    config: ExperimentConfig
    store: RunStore
    task: Task
    strategy: QueryStrategy
    data: Data
    n_rounds: int
    progress: bool
    base_model: Any = None
    tokenizer: Any = None
    fingerprint: str = ""  # of the base model's weights ("" when it has none: no caching)
    model: Any = None
    tracker: Any = None
    by_id: dict[str, Example] = field(default_factory=dict)  # pool and task.labelled examples
    precision: dict[str, str] | None = None  # of the protocol id (`starlora.run.identity`)

    @property
    def max_new_tokens(self) -> int:
        """Longest generated answer, for label-free scoring and drafts."""
        return self.config.scoring.max_new_tokens or self.config.evaluation.max_new_tokens

    def prompt_ids(self, ex: Example) -> list[int]:
        """`ex`'s prompt tokens, cut on the left as training cuts them: to
        ``training.max_length`` capped at the model's positions (`starlora.models.token_limit`)."""
        from starlora.models import token_limit

        limit = token_limit(self.base_model, self.config.training.max_length)
        return self.task.prompt_ids(self.tokenizer, ex, limit)

    def check_room(self) -> None:
        """A ConfigError, before any work, when a setting's ``max_new_tokens`` leave no room for
        a prompt in the model's maximum positions (`starlora.models.prompt_room`):
        evaluation's when the test answers are generated, the pool's (``scoring.max_new_tokens``,
        else evaluation's) when pool answers are (own-answer scoring, a human query's drafts)."""
        from starlora.evaluation import resolve_mode
        from starlora.models import prompt_room

        cfg = self.config
        if resolve_mode(self.task, self.data.test, cfg.evaluation.mode) == "generate":
            prompt_room(self.base_model, cfg.evaluation.max_new_tokens,
                        "evaluation.max_new_tokens")
        if cfg.scoring.answers == "generated" or cfg.active_learning.oracle == "human":
            section = "scoring" if cfg.scoring.max_new_tokens else "evaluation"
            prompt_room(self.base_model, self.max_new_tokens, f"{section}.max_new_tokens")

    def adapted(self, k: int) -> Any:
        """The model with round `k`'s adapter, loaded from the run directory if need be."""
        if self.model is None:
            from starlora.adapters import load_adapter

            self.model = load_adapter(self.base_model, self.store.adapter_dir(k))
        return self.model

    def labelled_examples(self) -> list[Example]:
        """The labels as training takes them, in labelled.jsonl's order: the question of
        each id's pool (or task.labelled) example with its label's answer. An id that is in
        neither (a hand-edited file) is a DataError naming labelled.jsonl and its line."""
        rows = self.store.labelled()
        unknown = [r["id"] for r in rows if r["id"] not in self.by_id]
        if unknown:
            path = self.store.paths.labelled
            line = next(n for n, r in read_records(path) if r.get("id") == unknown[0])
            more = f" ({len(unknown) - 1} more ids are not either)" if len(unknown) > 1 else ""
            raise DataError(str(path), line, "id", f"{unknown[0]!r} is not in the pool nor in "
                            f"task.labelled{more}")
        return [Example(r["id"], self.by_id[r["id"]].question, r["answer"]) for r in rows]

    def check_labels(self) -> None:
        """`labelled_examples`' checks, before any work (a hand-edited labelled.jsonl)."""
        self.labelled_examples()

    def say(self, k: int, message: str) -> None:
        say(f"round {k}/{self.n_rounds - 1}: {message}")
