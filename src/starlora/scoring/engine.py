"""The scoring engine: `score_examples` (teacher-forced PE/ME, MC dropout), which
`starlora.scoring.base_scores` (the frozen base model, cached, in fixed shapes) and
`starlora.scoring.own_answers` (label-free: the model scores its own generated answers) run.

How it is fast: examples are sorted by length and grouped into batches of about
`max_tokens_per_batch` tokens. On CPU a batch is one row of sequences packed back to back
(`starlora.scoring.packing`); elsewhere right-padded rows. The decoder body runs once per
batch and pass; the LM head runs only at answer positions, in vocabulary tiles
(`starlora.scoring.measures`). Each peft LoRA layer runs a fused forward while scoring
(`starlora.scoring.lora_fastpath`).

Monte-Carlo dropout (`mc_passes` K > 1): the LoRA dropout on A's input (and, with
`model_dropout`, the model's own ``nn.Dropout`` modules) really samples in every pass. On CPU
the LoRA layers draw each example's masks from a stream seeded by the base seed, the
example's id and the pass (`starlora.scoring.options.example_seeds`), whether they run fused or
as peft runs them (the plain path, ZeRO-3, LoRA variants), so an example's scores do not
depend on its batch, on the path or on how the pool is split between processes. torch's own
dropout (the model's, GPUs) is seeded per (batch, pass). When no dropout is active the model
runs once and the pass is repeated.

Precision: `ScoringOptions.dtype` other than the model's casts the model's weights to it for
the call and restores them after it (`weights_cast`; bf16 on CPUs with native bf16 is ~2x
faster than fp32).

Self-check: every call first scores its shortest example both ways, fast and with the plain
definition (`starlora.scoring.reference`), in the caller's precision; if they disagree, a
`ScorerFallbackWarning` names the model class and the whole call runs the plain way.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from starlora import zero3
from starlora.attention import attention_kernels
from starlora.errors import ConfigError, ScorerFallbackWarning
from starlora.models import decoder_and_head, logit_transform, unwrap_model
from starlora.scoring.batching import (
    BUCKET,
    BatchTooLarge,
    batch_end,
    batch_inputs,
    encode_pairs,
    fixed_batch,
    sequence_rows,
)
from starlora.scoring.lora_fastpath import MaskSampler, scoring_mode
from starlora.scoring.measures import (
    CHUNK_ELEMENTS,
    CPU_VOCAB_TILE,
    GPU_CHUNK_ELEMENTS,
    answer_measures,
    head_rows,
)
from starlora.scoring.options import ScoringOptions, example_seeds, resolve_dtype, unique_keys
from starlora.scoring.packing import can_pack, packed_attention_for, packed_lengths
from starlora.scoring.reference import plain_batch
from starlora.scoring.results import Scores
from starlora.tasks import Example, Task

#: default tokens per batch on CPU: measured fastest on SmolLM2-135M (1024-8192 tried)
CPU_TOKENS_PER_BATCH = 2048
#: default padded tokens per batch on GPUs (halved on out-of-memory)
GPU_TOKENS_PER_BATCH = 16384
#: examples per batch under DeepSpeed ZeRO-3 with ``batch_size: auto``: every process must run
#: as many batches as the others, which a count of examples (on equal shares) guarantees
ZERO3_BATCH_SIZE = 8
#: the self-check scores at most this many prompt and answer tokens of the shortest example
#: (short CPU forwards cost about the same whatever their length: reading the weights rules)
CHECK_TOKENS = 16


def _score_batch(
    model: nn.Module,
    body: nn.Module,
    head: nn.Module,
    transform: Callable[[torch.Tensor], torch.Tensor] | None,
    seqs: list[tuple[list[int], list[int]]],
    pad_id: int,
    device: torch.device,
    want_pe: bool,
    want_me: bool,
    seeds: list[int] | None,
    sampler: MaskSampler,
    packed: bool,
    mask_seeds: list[list[int]] | None = None,
    width: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-position NLL and entropy of one batch, for each pass (pass k seeds torch with
    ``seeds[k]`` and `sampler` with ``mask_seeds[k]`` [len(seqs)], one stream per sequence, or
    with ``seeds[k]`` when `mask_seeds` is None).

    Returns (owner [P] int: index of the example in `seqs` of each answer position,
    nll [K, P] float64, entropy [K, P] float64), P = total answer tokens of the batch,
    K = len(seeds) or 1 (deterministic). With `width` (fixed shapes), rows are padded to it and
    the LM head runs on ``len(seqs) * width`` rows (the answer positions, then zeros) rounded
    up to whole chunks of `head_rows`, so that a row's bits do not follow the batch-mates.
    """
    arrays, flat, targets, owner = batch_inputs(seqs, pad_id, packed, width)
    inputs = {k: None if v is None else torch.from_numpy(v).to(device) for k, v in arrays.items()}
    flat_t = torch.from_numpy(flat).to(device)
    tgt_t = torch.from_numpy(targets).to(device)
    P = len(owner)
    lengths = [len(p) + len(a) for p, a in seqs]
    cpu = device.type == "cpu"
    vocab_tile, max_elements = (CPU_VOCAB_TILE, CHUNK_ELEMENTS) if cpu else (None, GPU_CHUNK_ELEMENTS)
    chunk = head_rows(head, vocab_tile, max_elements)
    fixed_rows = -(-len(seqs) * width // chunk) * chunk  # whole head chunks of fixed rows
    if width:
        tgt_t = torch.cat([tgt_t, tgt_t.new_zeros(fixed_rows - P)])

    starts = sequence_rows(lengths, packed, width)
    passes = seeds if seeds is not None else [None]
    nll = np.full((len(passes), P), np.nan)
    ent = np.full((len(passes), P), np.nan)
    for k, seed in enumerate(passes):
        if seed is not None:
            torch.manual_seed(seed)  # torch's dropouts (the model's own; GPUs)
            sampler.seed_pass(seed, None if mask_seeds is None else mask_seeds[k], starts,
                              lengths)
        with packed_lengths(lengths) if packed else contextlib.nullcontext():
            out = body(**inputs, use_cache=False)[0]  # [rows, T, H]
        hidden = out.reshape(-1, out.shape[-1])[flat_t]  # [P, H], only answer positions
        del out
        if width:  # fixed shapes: as many head rows as the batch has tokens, in whole
            # chunks of `head_rows` (their count rounds the bits), the extra ones zeros
            hidden = torch.cat([hidden, hidden.new_zeros(fixed_rows - P, hidden.shape[1])])
        nll_k, ent_k = answer_measures(
            hidden, head, tgt_t, transform, want_me, vocab_tile, max_elements
        )
        if want_pe:
            nll[k] = nll_k[:P].numpy()
        if want_me:
            ent[k] = ent_k[:P].numpy()
    return owner, nll, ent


@contextlib.contextmanager
def weights_cast(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """`model`'s floating-point parameters and buffers in `dtype` for the duration (what
    ``model.to(dtype)`` casts), each restored on exit to the very tensor it held: no copy of
    the model, and only the cast weights' memory on top of the caller's."""
    saved = [(t, t.data) for t in (*model.parameters(), *model.buffers())
             if t.is_floating_point() and t.dtype != dtype]
    try:
        for t, data in saved:
            t.data = data.to(dtype)
        yield
    finally:
        for t, data in saved:
            t.data = data


def fast_path_disagreement(
    model: nn.Module,
    seq: tuple[list[int], list[int]],
    pad_id: int,
    device: torch.device,
    packed: bool,
) -> str | None:
    """Score `seq` deterministically (no dropout, the adapter as it is) with the fast path and
    with `plain_batch`; None when PE and ME agree within ``tol * max(1, |plain|)``, tol =
    1e-4 for float32/float64 weights and 2e-2 for bf16/fp16 ones (their logits are rounded
    to ~3 digits), else the warning. Two forward passes of one sequence; draws no random
    numbers."""
    body, head = decoder_and_head(model)
    packing = packed_attention_for(model) if packed else contextlib.nullcontext()
    with scoring_mode(model), torch.inference_mode(), attention_kernels(device), packing:
        fast = _score_batch(model, body, head, logit_transform(model), [seq], pad_id, device, True, True,
                            None, MaskSampler(device), packed)
    with scoring_mode(model, fused=False), torch.inference_mode(), attention_kernels(device):
        plain = plain_batch(model, [seq], pad_id, device, None)
    dtype = next(model.parameters()).dtype
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2
    bad = [
        f"{name} {f:.6g} vs {r:.6g}"
        for name, f, r in zip(("PE", "ME"), (fast[1].sum(), fast[2].sum()),
                              (plain[1].sum(), plain[2].sum()))
        if not abs(f - r) <= tol * max(1.0, abs(r))  # NaN disagrees too
    ]
    if not bad:
        return None
    return (f"{type(unwrap_model(model)).__name__}: the fast scorer disagrees with "
            f"model.forward(...).logits ({', '.join(bad)}); scoring with the plain forward path")


def score_examples(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    options: ScoringOptions | None = None,
    *,
    answer_ids: Sequence[Sequence[int]] | None = None,
    progress: bool = True,
    desc: str = "scoring",
    mc_salts: Sequence[int] | None = None,
    **fields: Any,
) -> Scores:
    """PE and ME of every example's answer under `model` (plain or peft), teacher-forced: the
    gold answer, or with `answer_ids` the given token ids (e.g. the model's own generation).
    How: `options` (a `ScoringOptions`), with any of its fields overridden by name in
    `fields` (``mc_passes=3``...). Returns `Scores` aligned with `examples`. `mc_salts`: run
    only these MC passes, by index (each samples the masks that pass of a whole call samples;
    dropout samples even in one pass), in place of ``range(mc_passes)``: how
    `starlora.scoring.own_answers` adds passes 1..K-1 to the first pass its generation measured.

    Self-check: the shortest example with an answer, cut to its last `CHECK_TOKENS` prompt and
    first `CHECK_TOKENS` answer tokens, is first scored deterministically both by the fast path
    and by `plain_batch`, the model's own ``forward(...).logits``. If PE or ME
    differ by more than ``1e-4 * max(1, |plain|)`` (float32/float64 weights; ``2e-2 *`` for
    bf16/fp16 weights, whose logits carry ~3 digits), a `ScorerFallbackWarning` names the
    model class and the whole call runs `plain_batch` on padded batches (`packed` ignored; MC
    masks on CPU as on the fast path, see the module's docstring).
    The check draws no random numbers and leaves the scores of an agreeing model unchanged.
    With `options.dtype` other than the model's, the check runs on the caller's model, in its
    precision, before its weights are cast: the fast path computes the same thing in any
    dtype, and a wrong one shows at 1e-4 in float32, whereas two bf16 computations of the
    right thing round differently (on a trained SmolLM2 adapter, by up to 5% of a 16-token
    ME), which would send every bf16 call down the slow plain path.
    """
    opts = ScoringOptions.build(options, **fields)
    measures, mc_passes, model_dropout = opts.measures, opts.mc_passes, opts.model_dropout
    batch_size, max_length, seed, packed = (opts.batch_size, opts.max_length, opts.seed,
                                            opts.packed)
    max_tokens_per_batch, max_padding = opts.max_tokens_per_batch, opts.max_padding
    zero = zero3.enabled()  # partitioned weights: the plain forward, in fixed-size batches
    fixed = None if zero else opts.fixed_shape
    by_tokens = batch_size == "auto" and not zero
    weights = next(model.parameters())
    dtype = resolve_dtype(opts.dtype, weights.device, weights.dtype)
    cast = dtype is not None and dtype != weights.dtype  # after the self-check (docstring)
    body, head = decoder_and_head(model)
    transform = logit_transform(model)
    device = next(model.parameters()).device
    if max_tokens_per_batch is None:
        max_tokens_per_batch = (
            CPU_TOKENS_PER_BATCH if device.type == "cpu" else GPU_TOKENS_PER_BATCH
        )
    limit = max_tokens_per_batch if by_tokens else \
        ZERO3_BATCH_SIZE if batch_size == "auto" else int(batch_size)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if max_padding is None:
        max_padding = 0.1 if device.type == "cpu" else 0.5
    seqs = encode_pairs(model, tokenizer, task, examples, max_length, answer_ids)
    lengths = np.array([len(p) + len(a) for p, a in seqs], np.int64)
    n_tok = np.array([len(a) for _, a in seqs], np.int64)
    widths = -(-lengths // BUCKET) * BUCKET if fixed else lengths
    order = np.argsort(-widths, kind="stable")  # longest first: an OOM shows up at once
    longest = int(lengths.max(initial=0))
    if zero or fixed:
        packed = False
    elif packed is None:
        packed = device.type == "cpu" and can_pack(model, longest)
    elif packed and not can_pack(model, longest):
        raise ConfigError(
            "scoring: packed batches need a model with SDPA attention and sequences no longer "
            "than its sliding window"
        )
    check = next((int(i) for i in order[::-1] if n_tok[i] > 0), None)  # the shortest
    problem = None if check is None or zero else fast_path_disagreement(
        model, (seqs[check][0][-CHECK_TOKENS:], seqs[check][1][:CHECK_TOKENS]), pad_id,
        device, packed,
    )
    if problem is not None:
        warnings.warn(problem, ScorerFallbackWarning, stacklevel=2)
        packed = False
    plain = zero or problem is not None

    salts = list(range(mc_passes)) if mc_salts is None else [int(k) for k in mc_salts]
    N, K = len(examples), len(salts)
    pe = np.full((N, K), np.nan)
    me = np.full((N, K), np.nan)
    want_pe, want_me = "pe" in measures, "me" in measures

    from tqdm.auto import tqdm

    bar = tqdm(total=N, desc=desc, unit="ex", disable=not progress, dynamic_ncols=True)
    fork_devices = [device] if device.type == "cuda" else []
    sampler = MaskSampler(device)
    with contextlib.ExitStack() as stack:
        if cast:
            stack.enter_context(weights_cast(model, dtype))
        stack.enter_context(zero3.forward_hooks(model))  # before the dropout modes are set
        stochastic = stack.enter_context(
            scoring_mode(model, K > 1 or mc_salts is not None, model_dropout, sampler,
                         fused=not plain)
        )
        if stochastic and seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        keys = unique_keys([ex.id for ex in examples])
        per_example = np.array([example_seeds(seed, keys, k) for k in salts], np.uint64) \
            if stochastic else None  # [K, N]
        stack.enter_context(torch.random.fork_rng(devices=fork_devices, enabled=stochastic))
        stack.enter_context(zero3.inference_mode())
        stack.enter_context(attention_kernels(device))
        if packed:
            stack.enter_context(packed_attention_for(model))
        start = 0
        while start < N:
            fill, width = [], 0
            if fixed:  # rows without answers fill the batch up (`fixed_batch`)
                idx, fill, width = fixed_batch(widths, order, start, fixed, ([pad_id], []))
                end = start + len(idx)
            else:
                end = min(start + limit, N) if zero else \
                    batch_end(lengths, order, start, limit, by_tokens, max_padding, packed)
                idx = order[start:end]
            # one seed per (batch start, pass): reproducible given the base seed
            seeds = [seed + 1_000_003 * start + k for k in salts] if stochastic else None
            batch = [seqs[i] for i in idx] + fill
            try:
                mask_seeds = None if per_example is None else \
                    [[int(s) for s in per_example[k, idx]] + [0] * len(fill) for k in range(K)]
                if plain:
                    owner, nll, ent = plain_batch(model, batch, pad_id, device, seeds, sampler,
                                                  mask_seeds, width)
                else:
                    owner, nll, ent = _score_batch(model, body, head, transform, batch, pad_id,
                                                   device, want_pe, want_me, seeds, sampler,
                                                   packed, mask_seeds, width)
            except torch.OutOfMemoryError as e:
                if fixed and len(batch) > 1:  # the caller's cache key names the shape
                    raise BatchTooLarge(str(e)) from e
                if end - start == 1 or zero:  # processes must run the same batches
                    raise
                limit = max(1, limit // 2)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            example = idx[owner]  # [P] original example index of each answer position
            for k in range(nll.shape[0]):  # float64 sums per example
                if want_pe:
                    pe[idx, k] = 0.0
                    np.add.at(pe[:, k], example, nll[k])
                if want_me:
                    me[idx, k] = 0.0
                    np.add.at(me[:, k], example, ent[k])
            if not stochastic and K > 1:  # no active dropout: all passes are this one
                pe[idx, 1:] = pe[idx, :1]
                me[idx, 1:] = me[idx, :1]
            bar.update(end - start)
            start = end
    bar.close()

    denom = np.maximum(n_tok, 1)
    pe_avg, me_avg = pe.mean(axis=1), me.mean(axis=1)
    return Scores(
        ids=[ex.id for ex in examples],
        pe=pe_avg,
        pe_per_token=pe_avg / denom,
        me=me_avg,
        me_per_token=me_avg / denom,
        n_answer_tokens=n_tok,
        pe_passes=pe if K > 1 or mc_salts is not None else None,
        me_passes=me if K > 1 or mc_salts is not None else None,
    )
