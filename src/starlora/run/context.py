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
        """`ex`'s prompt tokens, cut on the left to ``training.max_length`` as training does."""
        return self.task.prompt_ids(self.tokenizer, ex, self.config.training.max_length)

    def adapted(self, k: int) -> Any:
        """The model with round `k`'s adapter, loaded from the run directory if need be."""
        if self.model is None:
            from starlora.adapters import load_adapter

            self.model = load_adapter(self.base_model, self.store.adapter_dir(k))
        return self.model

    def labelled_examples(self) -> list[Example]:
        return [Example(r["id"], self.by_id[r["id"]].question, r["answer"])
                for r in self.store.labelled()]

    def say(self, k: int, message: str) -> None:
        say(f"round {k}/{self.n_rounds - 1}: {message}")
