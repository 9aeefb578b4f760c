"""Prompt embeddings from the frozen base model, cached on disk by content.

`embed_prompts` turns N prompts (token ids) into an [N, d] float32 array, d the model's hidden
size: the **mean over the prompt's tokens of the decoder's last hidden state** (after the final
norm, the input of the LM head), with the LoRA adapter disabled.

Why the mean, not the last token: in a causal LM the last position's state is shaped to
predict the next token (for a templated prompt, the first token of the answer, much the same
for every prompt), whereas each position's state encodes its own token in context, so their
mean describes the whole question. Mean pooling is the usual sentence embedding of a decoder
(e.g. SGPT, Muennighoff 2022, and the mean-pooled baselines of the MTEB leaderboard), and
needs no extra model: the base model is already loaded for scoring. Distances between these
vectors are taken as they are (Euclidean, by the strategies in `starlora.acquisition`).

Batches have **fixed shapes** (`batch_shape`, as `starlora.generation` decodes below fp32): a
prompt is right-padded to the next multiple of `BUCKET` tokens and embedded only with prompts
of that width, always as many rows a batch (a short batch filled with copies of its first
prompt). The kernels round a row's numbers by the batch's shape, not by the other rows, so a
prompt's embedding is the same bits whatever else is embedded with it, in whatever order,
share or chunk. With length-sorted batches it was not: in bf16, SmolLM2 embedded 8 of 12
prompts to other bits alone than in a batch of 24 (up to 0.07 apart), so a cached embedding
depended on which run had computed it, and with what.

`EmbeddingCache` keeps them on disk, shared by every run of one user, the way base scores are
(`starlora.scoring.cache`): a folder per `embedding_cache_key` (weights' fingerprint, dtype,
max_length, pooling, batch shape), in it one safetensors file per computed chunk, each record
named by the `sequence_key` of the prompt's token ids. Files are written atomically and never
changed, so a computation killed anywhere resumes from its finished chunks to the same bytes,
and processes may share a folder.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from starlora import zero3
from starlora.attention import attention_kernels
from starlora.errors import ConfigError
from starlora.io import atomic_write
from starlora.models import cache_dir, decoder_and_head
from starlora.scoring.batching import BUCKET, BatchTooLarge
from starlora.scoring.cache import sequence_key
from starlora.scoring.engine import weights_cast
from starlora.scoring.lora_fastpath import adapter_disabled

#: how a prompt becomes one vector (part of the cache key: another pooling is another cache)
POOLING = "mean-last-hidden"
#: padded tokens per batch by default: CPU (measured on SmolLM2-135M, 1024-8192 tried) and GPU
CPU_TOKENS_PER_BATCH = 4096
GPU_TOKENS_PER_BATCH = 32768
#: prompts per batch under DeepSpeed ZeRO-3: every process must run as many forward passes
ZERO3_BATCH_SIZE = 8
def batch_shape(batch_size: int | str, max_tokens_per_batch: int | None,
                device: torch.device) -> tuple[str, int]:
    """How `embed_prompts` sizes its batches: ``("tokens", T)``, as many rows of a width W as
    fit in T padded tokens (``batch_size="auto"``; T from `max_tokens_per_batch` or the
    device's default), or ``("rows", B)``. Part of the cache key: the shape rounds the bits."""
    if batch_size != "auto":
        return "rows", int(batch_size)
    if max_tokens_per_batch is None:
        max_tokens_per_batch = CPU_TOKENS_PER_BATCH if device.type == "cpu" \
            else GPU_TOKENS_PER_BATCH
    return "tokens", int(max_tokens_per_batch)


def embed_prompts(
    model: nn.Module,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    *,
    batch_size: int | str = "auto",
    max_tokens_per_batch: int | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    desc: str = "embedding prompts (base model)",
    bar: Any = None,
    fixed_shapes: bool | None = None,
    halve_on_oom: bool = True,
    shape: tuple[str, int] | None = None,
) -> np.ndarray:
    """[N, d] float32: the mean-pooled last hidden state of each of `prompt_ids` ([N] lists of
    token ids, used as given: cut them to length first) under `model` with its adapter
    disabled (a peft model or a plain causal LM).

    Prompts run widest first, `batch_shape` rows a batch (``batch_size="auto"``: as many as
    fit in `max_tokens_per_batch` padded tokens; `shape`, a `batch_shape`, in place of both),
    halved on an out-of-memory error, which changes the shapes from there on
    (``halve_on_oom=False``: `BatchTooLarge` is raised instead, for a caller whose cache key
    names the shape), in fixed shapes (module docstring); with ``fixed_shapes=False`` in
    length-sorted batches as wide as their longest prompt (faster, bits that follow the
    batch-mates), as always under ZeRO-3, there `ZERO3_BATCH_SIZE` prompts a batch (its
    processes must run as many batches as each other). `dtype`: the precision of the
    forward pass (the weights are cast for the call), None = the model's. An empty prompt
    is an error (ValueError): it has no tokens to average. `bar`: a tqdm bar to advance
    instead of a bar of its own (a caller that embeds in several calls shows one bar)."""
    n = len(prompt_ids)
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("embed_prompts: an empty prompt has no tokens to average")
    body, head = decoder_and_head(model)
    weights = next(model.parameters())
    device = weights.device
    # the width of the final hidden states: what the head reads (OPT-350m projects the
    # decoder's hidden_size down to it; a multimodal config keeps hidden_size in text_config)
    width = getattr(head, "in_features", None) or body.config.get_text_config().hidden_size
    out = np.zeros((n, int(width)), np.float32)
    if n == 0:
        return out
    zero = zero3.enabled()
    if shape is None:
        shape = ("rows", ZERO3_BATCH_SIZE) if zero and batch_size == "auto" else \
            batch_shape(batch_size, max_tokens_per_batch, device)
    mode, limit = shape
    fixed = (fixed_shapes is None or fixed_shapes) and not zero
    lengths = np.array([len(p) for p in prompt_ids], np.int64)
    widths = -(-lengths // BUCKET) * BUCKET if fixed else lengths
    order = np.argsort(-widths, kind="stable")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    from tqdm.auto import tqdm

    own_bar = bar is None
    if own_bar:
        bar = tqdm(total=n, desc=desc, unit="prompt", disable=not progress, dynamic_ncols=True)
    with contextlib.ExitStack() as stack:
        if dtype is not None and dtype != weights.dtype:
            stack.enter_context(weights_cast(model, dtype))
        stack.enter_context(adapter_disabled(model))
        stack.enter_context(zero3.forward_hooks(model))
        stack.enter_context(zero3.inference_mode())
        stack.enter_context(attention_kernels(device))
        was_training = body.training
        body.eval()
        stack.callback(body.train, was_training)
        start = 0
        while start < n:
            width = int(widths[order[start]])
            size = max(1, limit // width) if mode == "tokens" else limit
            idx = order[start:start + size]
            if fixed:  # one width a batch, always `size` rows
                idx = idx[widths[idx] == width]
                rows = [*idx, *[idx[0]] * (size - len(idx))]
            else:  # as wide as its longest prompt, the first
                rows = list(idx)
            try:
                values = _embed_batch(body, [prompt_ids[i] for i in rows], pad_id, device, width)
                out[idx] = values[:len(idx)]
            except torch.OutOfMemoryError as e:
                if size == 1 or zero:
                    raise
                if not halve_on_oom:
                    raise BatchTooLarge(str(e)) from e
                limit = max(1, limit // 2)
                _free(device)
                continue
            bar.update(len(idx))
            start += len(idx)
    if own_bar:
        bar.close()
    return out


def _free(device: torch.device) -> None:
    """Give the allocator's cached blocks back after an out-of-memory error."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _embed_batch(body: nn.Module, prompts: list[Sequence[int]], pad_id: int,
                 device: torch.device, width: int) -> np.ndarray:
    """[B, d] float32 mean-pooled final hidden states of one batch right-padded to `width`
    tokens (causal attention: a real token never sees the padding after it)."""
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
        mask[row, : len(p)] = 1
    ids, mask = ids.to(device), mask.to(device)
    hidden = body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    m = mask.unsqueeze(-1).to(torch.float32)
    pooled = (hidden.to(torch.float32) * m).sum(dim=1) / m.sum(dim=1)
    return pooled.cpu().numpy()


# -- the cache ---------------------------------------------------------------------------------
def default_embedding_cache_dir() -> Path:
    """``<starlora cache>/embeddings``, shared by all runs of this user."""
    return cache_dir() / "embeddings"


def embedding_cache_key(fingerprint: str, *, dtype: torch.dtype, max_length: int | None = None,
                        shape: tuple[str, int]) -> dict[str, Any]:
    """The key of one embedding cache folder: what, besides a prompt's token ids (its
    `sequence_key`), changes its embedding. `fingerprint`: `starlora.models.model_fingerprint`
    of the weights (a model without one, "", cannot be cached: ConfigError); `dtype`: the
    precision of the forward pass; `max_length`: where prompts were cut; `shape`: the
    `batch_shape` of the fixed-shape batches (with `BUCKET`), which round the last bits.
    Version 2: fixed shapes (version 1's length-sorted batches made bits follow batch-mates)."""
    if not fingerprint:
        raise ConfigError("embedding cache: the model has no fingerprint of its weights")
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"embedding cache: dtype must be a torch.dtype, got {dtype!r}")
    return {"version": 2, "pooling": POOLING, "model": fingerprint, "dtype": str(dtype),
            "max_length": max_length, "bucket": BUCKET, "batch": list(shape)}


class EmbeddingCache:
    """Embeddings on disk: ``<directory>/<sha of key>/`` holds ``key.json`` (the key, for
    humans) and one ``<sha of its records>.safetensors`` per computed chunk: tensor
    ``embeddings`` [n, d] float32, metadata ``keys`` (the n records' `sequence_key`s, comma
    separated). Each file is written atomically and never rewritten; a record found in two
    files (two processes computed it at once) is read from the first by name."""

    def __init__(self, directory: str | Path, key: dict[str, Any], chunk_size: int = 1024):
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode())
        self.key = dict(key)
        self.folder = Path(directory) / digest.hexdigest()[:20]
        self.chunk_size = chunk_size
        self.computed = 0  # prompts computed (not found) by the last get_or_compute
        self._seen: set[str] = set()  # chunk files already read into `_rows`
        self._rows: dict[str, np.ndarray] = {}

    def load(self) -> dict[str, np.ndarray]:
        """Every record on disk by sequence key ([d] float32 each); reads only the chunk files
        not read before."""
        from safetensors import safe_open

        if self.folder.is_dir():
            for path in sorted(self.folder.glob("*.safetensors")):
                if path.name in self._seen:
                    continue
                with safe_open(str(path), framework="np") as f:
                    keys = (f.metadata() or {}).get("keys", "").split(",")
                    values = f.get_tensor("embeddings")
                for k, v in zip(keys, values, strict=True):
                    self._rows.setdefault(k, v)
                self._seen.add(path.name)
        return self._rows

    def _write(self, keys: list[str], values: np.ndarray) -> None:
        from safetensors.numpy import save

        blob = save({"embeddings": np.ascontiguousarray(values, np.float32)},
                    metadata={"keys": ",".join(keys)})
        name = hashlib.sha256(",".join(keys).encode()).hexdigest()[:20]
        atomic_write(self.folder / f"{name}.safetensors", blob)

    def get_or_compute(
        self,
        prompt_ids: Sequence[Sequence[int]],
        compute: Callable[[list[Sequence[int]]], np.ndarray],
        *,
        bar: Any = None,
    ) -> np.ndarray:
        """[N, d] float32 embeddings of `prompt_ids`, computing (``compute(prompts) -> [n, d]``)
        only prompts not on disk yet, each once, `chunk_size` at a time in the order they first
        appear; before each chunk the folder is read again, so chunks another process wrote
        meanwhile are not computed twice. `bar` (tqdm), if given, gets the number to compute
        as its total."""
        keys = [sequence_key(p, []) for p in prompt_ids]
        have = self.load()
        todo: dict[str, int] = {}
        for i, k in enumerate(keys):
            if k not in have:
                todo.setdefault(k, i)
        missing = list(todo.items())
        self.computed = 0
        if bar is not None:
            bar.total = len(missing)
            bar.refresh()
        if missing:
            self.folder.mkdir(parents=True, exist_ok=True)
            key_path = self.folder / "key.json"
            if not key_path.is_file():
                atomic_write(key_path, json.dumps(self.key, indent=2, default=str) + "\n")
        for s in range(0, len(missing), self.chunk_size):
            if s:
                have = self.load()
            chunk = [(k, i) for k, i in missing[s:s + self.chunk_size] if k not in have]
            if not chunk:
                continue
            values = np.asarray(compute([prompt_ids[i] for _, i in chunk]), np.float32)
            if values.shape[0] != len(chunk):
                raise ValueError(f"compute returned {values.shape[0]} rows for {len(chunk)}")
            self._write([k for k, _ in chunk], values)
            self.computed += len(chunk)
            for (k, _), v in zip(chunk, values):
                have.setdefault(k, v)
        if not keys:
            return np.zeros((0, 0), np.float32)
        return np.stack([have[k] for k in keys]).astype(np.float32, copy=False)


def cached_embeddings(
    model: nn.Module,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    *,
    fingerprint: str,
    dtype: torch.dtype,
    max_length: int | None,
    directory: str | Path | None = None,
    progress: bool = True,
    desc: str = "embedding prompts (base model, cached)",
    **options: Any,
) -> np.ndarray:
    """`embed_prompts` of `prompt_ids` through an `EmbeddingCache` in `directory` (default
    `default_embedding_cache_dir`); a model without a `fingerprint` is embedded every time.
    `options` go to `embed_prompts` (batch_size, max_tokens_per_batch; always fixed shapes:
    the key names them). An out-of-memory error in a batch of several rows (`BatchTooLarge`)
    halves the batch shape and starts again in the cache folder of the halved shape, so that
    a folder holds only what its key's shape computes (chunks written before stay in theirs).
    One progress bar (`progress`, `desc`) counts the prompts computed, not those found on
    disk."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(prompt_ids), desc=desc, unit="prompt", disable=not progress,
               dynamic_ncols=True, delay=1)  # shown only if it lasts: all found on disk, none

    try:
        if not fingerprint:
            bar.total = len(prompt_ids)
            return embed_prompts(model, tokenizer, list(prompt_ids), dtype=dtype, bar=bar,
                                 **options)
        device = next(model.parameters()).device
        shape = batch_shape(options.pop("batch_size", "auto"),
                            options.pop("max_tokens_per_batch", None), device)

        while True:
            cache = EmbeddingCache(directory or default_embedding_cache_dir(),
                                   embedding_cache_key(fingerprint, dtype=dtype,
                                                       max_length=max_length, shape=shape))
            compute = functools.partial(embed_prompts, model, tokenizer, dtype=dtype, bar=bar,
                                        halve_on_oom=False, shape=shape, **options)
            try:
                return cache.get_or_compute(prompt_ids, compute, bar=bar)
            except BatchTooLarge:
                shape = (shape[0], max(1, shape[1] // 2))
                _free(device)
                bar.reset()
    finally:
        bar.close()
