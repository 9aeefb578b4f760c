"""Base-model scores: `score_base`, the frozen base model's PE/ME, read from and written to
the on-disk `BaseScoreCache` in fixed shapes."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from starlora import zero3
from starlora.scoring.batching import BUCKET, BatchTooLarge, encode_pairs
from starlora.scoring.cache import BaseScoreCache, sequence_key
from starlora.scoring.engine import CPU_TOKENS_PER_BATCH, GPU_TOKENS_PER_BATCH, score_examples
from starlora.scoring.lora_fastpath import adapter_disabled
from starlora.scoring.options import ScoringOptions
from starlora.scoring.results import Scores
from starlora.tasks import Example, Task


def score_base(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    *,
    cache: BaseScoreCache | None = None,
    **kwargs: Any,
) -> Scores:
    """`score_examples` with the LoRA adapter disabled (the frozen base model; works for a
    plain model too), always deterministic (K = 1). With `cache`, scores already on disk are
    reused and only the missing sequences are computed: `cache` must have been made for this
    model's weights and dtype (`base_cache_key`); examples are matched by the tokens scored.
    Cached scores are computed in fixed shapes (`ScoringOptions.fixed_shape`, from
    `batch_size` and `max_tokens_per_batch`), which the file's key then names too: a record
    must not depend on which run met the sequence first, nor with which batch-mates (in bf16
    that moved PE by up to 0.5 nats on SmolLM2). An out-of-memory error halves the shape and
    goes on in the file of the halved shape. Under DeepSpeed ZeRO-3, whose processes must run
    as many batches as each other, records are computed in plain batches and do follow their
    batch-mates (a file of their own, keyed ``"batch": "zero3"``), and a record missing on
    any process has every process compute its whole share (`BaseScoreCache.records`)."""
    kwargs = {**kwargs, "mc_passes": 1}
    kwargs.setdefault("desc", "scoring base")
    answers = kwargs.pop("answer_ids", None)
    names = {f.name for f in dataclasses.fields(ScoringOptions)}
    opts = ScoringOptions.build(kwargs.get("options"),
                                **{k: v for k, v in kwargs.items() if k in names})
    seqs = encode_pairs(model, tokenizer, task, examples, opts.max_length, answers)
    keys = [sequence_key(p, a) for p, a in seqs]
    answer_of = dict(zip(keys, (a for _, a in seqs)))

    def compute(chunk: list[Example], chunk_keys: list[str], **shape: Any) -> Scores:
        given = None if answers is None else [answer_of[k] for k in chunk_keys]
        with adapter_disabled(model):
            return score_examples(model, tokenizer, task, chunk, answer_ids=given,
                                  **{**kwargs, **shape})

    if cache is None:
        return compute(list(examples), keys)
    shape = None if zero3.enabled() else fixed_shape(model, opts.batch_size,
                                                      opts.max_tokens_per_batch)
    # widest first, so that each chunk the cache computes holds few widths (a width's last
    # batch is filled up to the shape); records are keyed by content, so order is free
    order = sorted(range(len(seqs)), key=lambda i: -(len(seqs[i][0]) + len(seqs[i][1])))
    while True:
        shaped = {"batch": shape, "bucket": BUCKET} if shape else {"batch": "zero3"}
        keyed = BaseScoreCache(cache.directory, {**cache.key, **shaped}, cache.chunk_size)
        try:
            found = keyed.get_or_compute([examples[i] for i in order], [keys[i] for i in order],
                                         functools.partial(compute, fixed_shape=shape))
        except BatchTooLarge:
            shape = (shape[0], max(1, shape[1] // 2))
            if next(model.parameters()).device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        cache.computed = keyed.computed
        records = [{}] * len(order)
        for j, record in zip(order, found.to_records()):
            records[j] = record
        return Scores.from_records(records)


def fixed_shape(model: nn.Module, batch_size: int | str,
                max_tokens_per_batch: int | None) -> tuple[str, int]:
    """The fixed batch shape (`ScoringOptions.fixed_shape`) that scoring options ask for:
    ``("rows", batch_size)``, or ``("tokens", T)`` with ``batch_size="auto"`` (T:
    `max_tokens_per_batch`, by default the device's `CPU_TOKENS_PER_BATCH` or
    `GPU_TOKENS_PER_BATCH`)."""
    if batch_size != "auto":
        return "rows", int(batch_size)
    if max_tokens_per_batch is None:
        cpu = next(model.parameters()).device.type == "cpu"
        max_tokens_per_batch = CPU_TOKENS_PER_BATCH if cpu else GPU_TOKENS_PER_BATCH
    return "tokens", int(max_tokens_per_batch)
