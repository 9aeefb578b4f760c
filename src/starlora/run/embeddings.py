"""The run's prompt embeddings, for strategies that look at where prompts lie (`typiclust`,
``active_learning.diversity: kmeans``).

They are computed once per run, in the first score phase whose strategy needs them: the
frozen base model embeds every prompt of the pool and of ``task.labelled``
(`starlora.scoring.embeddings`, cached by content across runs) and the run directory keeps
them in ``embeddings.safetensors`` (`RunStore.write_embeddings`). The select phase reads them
from there into the score table as two array columns (`embedding_columns`):

    "embedding"           [N, d] float32, row i the prompt of candidate i (aligned with ids)
    "labelled_embedding"  [M, d] float32, the M examples labelled so far, in labelling order

A run killed while embedding resumes from the chunks in the cache (each written atomically,
never changed), so the file it writes holds the same bytes; a run killed after writing it
reads it back. Under several processes each embeds a share and the main process writes the
file; under DeepSpeed ZeRO-3 the cache is not used (every process must run as many forward
passes as the others, which a partly filled cache would break).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from starlora import distributed as dist
from starlora import zero3
from starlora.acquisition.base import ARRAY_COLUMNS
from starlora.run.context import Run

#: score-table columns that come from the run's embeddings, not from scores.jsonl (the
#: acquisition contract's array columns)
EMBEDDING_COLUMNS = ARRAY_COLUMNS


def wants_embeddings(needs: Sequence[str]) -> bool:
    """Whether a strategy that reads the columns `needs` reads embeddings."""
    return any(c in EMBEDDING_COLUMNS for c in needs)


def ensure_embeddings(run: Run, model: Any) -> None:
    """Write the run's ``embeddings.safetensors`` unless it is there (every process calls this;
    `model`: the base model, or a peft model, whose adapter is disabled for the call)."""
    from starlora.run.pool_scores import _dtype
    from starlora.scoring.embeddings import cached_embeddings

    if dist.agree(lambda: run.store.paths.embeddings.is_file()):
        return
    examples = [*run.data.pool, *run.data.labelled]
    prompts = [run.prompt_ids(ex) for ex in examples]
    sc = run.config.scoring
    fingerprint = "" if zero3.enabled() else run.fingerprint

    def share(items: list[list[int]]) -> list[np.ndarray]:
        return list(cached_embeddings(
            model, run.tokenizer, items, fingerprint=fingerprint, dtype=_dtype(run),
            max_length=run.config.training.max_length, batch_size=sc.batch_size,
            max_tokens_per_batch=sc.max_tokens_per_batch, progress=run.progress,
            desc="embedding pool prompts (base model, cached)"))

    rows = dist.map_shards(share, prompts, [len(p) for p in prompts])
    if dist.is_main():
        run.store.write_embeddings([ex.id for ex in examples], np.stack(rows))


def embedding_columns(run: Run, ids: Sequence[str], needs: Sequence[str]) -> dict[str, np.ndarray]:
    """The embedding columns among `needs` for candidates `ids` (see the module docstring),
    read from the run directory."""
    if not wants_embeddings(needs):
        return {}
    stored = run.store.embeddings()
    if stored is None:
        raise RuntimeError(f"{run.store.paths.embeddings}: missing; the score phase writes it")
    stored_ids, values = stored
    row = {i: n for n, i in enumerate(stored_ids)}
    out = {}
    if "embedding" in needs:
        out["embedding"] = values[[row[i] for i in ids]]
    if "labelled_embedding" in needs:
        out["labelled_embedding"] = values[[row[r["id"]] for r in run.store.labelled()]]
    return out
