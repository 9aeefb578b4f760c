"""Batched generation of answers: for evaluation and for label-free uncertainty.

`generate` takes prompt token ids and returns, per prompt and sample, the generated token ids
(up to and including the first stop token) and the log-probability of each: prompts sorted by
length, left-padded, decoded with the KV cache, each row until its own EOS (or any end-of-turn
token of the model's generation config).

The decoding loop (`decode`) is transformers' greedy/multinomial ``generate`` loop for a
decoder-only model, written out so that each step reduces its logits at once: the chosen
token's log-probability and, asked, the NLL and entropy of the raw logits, [rows] numbers a
step instead of [rows, vocabulary] scores kept for every step and log-softmaxed afterwards.
It feeds the model what ``generate`` feeds it (the same position ids, attention mask, cache
class and ``logits_to_keep=1``), so the tokens are ``generate``'s and the log-probabilities
equal those of its logits within 1e-5 relative, with and without `compact`
(`tests/test_generation_loop.py`). It applies no logits processor: the tokens are the argmax
of the raw logits, or drawn from their softmax at `temperature` (what ``generate`` does with
the settings this module gives it; a model's own generation-config sampling defaults are not
read). `compact` drops stopped rows (and their cache rows) from the batch. A peft LoRA model
decodes with the scorer's fused LoRA forward (`starlora.scoring.lora_fastpath.scoring_mode`:
one ``addmm_`` per LoRA layer; the prefill merges the adapter into a temporary weight), so its
logits differ from peft's in the last bits.

Greedy decoding is deterministic, but in bf16 or fp16 a row's tokens can depend on its
batch-mates: the kernels round a row's numbers differently with the batch's row count and a
longer batch-mate's padding, and in low precision that flips near-ties (docs/benchmarks.md,
"bf16 answers and their batch-mates": 21 of 64 prompts in bf16, none in fp32). So greedy
decoding in less than fp32 uses **fixed shapes** (`fixed_shapes`): a prompt is left-padded to
the next multiple of `BUCKET` tokens above its length, batched only with prompts of that
width, `batch_size` rows a batch (filled with copies of its first prompt), none leaving it
(``compact=False``); its tokens and log-probabilities are then the same bits whatever shares
its batch, in whatever order, with any number of processes. The price: the filled rows and
those decoding after they stopped (100 arith prompts at 64 rows on a CPU: 1.36x fp32's speed,
not bf16's 2.14x). fp32 greedy keeps length-sorted batches and `compact`.

Sampling (``temperature > 0``): each prompt's K samples decode from one prefill, drawn from a
generator seeded by the prompt's seed, so the draws do not depend on the other prompts; a
batch holds one prompt's samples (bits that depend on nothing else), or a caller's group of
prompts (`groups`; ~3x faster for 6 prompts of 5 samples on a CPU thread: docs/benchmarks.md)
whose bits depend on the group: a caller wanting the same bits with any process count forms
groups before dealing them out (`starlora.distributed.map_groups`). Log-probabilities are those of
the tempered distribution the tokens were drawn from.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from starlora import zero3
from starlora.attention import attention_kernels
from starlora.models import prompt_room, stop_tokens
from starlora.scoring.batching import BUCKET  # a prompt: left-padded to the multiple above it

#: the dtypes whose greedy decoding keeps length-sorted batches (module docstring)
FULL_PRECISION = (torch.float32, torch.float64)


@dataclass
class Generated:
    """N prompts x S samples, row ``i * S + s`` = sample s of prompt i.

    `tokens` [N*S] lists of generated ids (the stop token included when generated);
    `logprobs` [N*S] float64 arrays of the same lengths (nats); `texts` [N*S] decoded without
    special tokens. With ``generate(measure=True)``: `nll`, `entropy` [N*S] float64 arrays
    (nats): per token its -log p and the entropy of the raw next-token logits (no
    temperature), the teacher-forced PE and ME terms of the first scoring pass."""

    tokens: list[list[int]]
    logprobs: list[np.ndarray]
    texts: list[str]
    samples: int = 1
    nll: list[np.ndarray] | None = None
    entropy: list[np.ndarray] | None = None
    #: the longest prompt fed to the model (`starlora.models.prompt_room`; longer ones lost
    #: their oldest tokens), None when the model states no maximum position count
    prompt_room: int | None = None

    def of(self, i: int) -> range:
        """Row indices of prompt i's samples."""
        return range(i * self.samples, (i + 1) * self.samples)

    def best_text(self, i: int) -> str:
        """Prompt i's most likely answer among its samples (the highest summed log-probability),
        stripped: the draft shown to people."""
        return self.texts[max(self.of(i), key=lambda j: float(self.logprobs[j].sum()))].strip()


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    samples: int = 1,
    temperature: float = 0.0,
    seeds: Sequence[int] | None = None,
    progress: bool = True,
    desc: str = "generate",
    measure: bool = False,
    compact: bool = True,
    fixed_shapes: bool | None = None,
    groups: Sequence[Any] | None = None,
) -> Generated:
    """Generate `samples` answers for each prompt (token ids) with `model` in eval mode.

    ``temperature == 0``: greedy, in batches of `batch_size` rows (several greedy samples
    would be copies: asking for them is an error). ``temperature > 0``: each prompt's
    `samples` rows decoded from one prefill of the prompt (`decode`'s `repeat`) and drawn from
    a generator seeded by ``seeds[i]`` (default: i); a batch per prompt, or per group label
    of `groups` [len(prompts)] (module docstring; not under ZeRO-3). `measure`: also the NLL
    and entropy of the raw logits per generated token (`Generated.nll`, `.entropy`).
    `compact`: drop stopped rows from their batch (`decode`; off under ZeRO-3). `fixed_shapes`
    (greedy; default: below fp32, never under ZeRO-3): shapes each row sets alone. A prompt
    longer than ``max_positions - max_new_tokens`` keeps its last tokens (`prompt_room`).
    """
    from tqdm.auto import tqdm

    from starlora.scoring.lora_fastpath import scoring_mode

    if samples < 1 or (samples > 1 and temperature <= 0):
        raise ValueError("several samples need a temperature > 0")
    room = prompt_room(model, max_new_tokens)  # a ConfigError when no prompt fits
    prompts = [p[-room:] if room is not None and len(p) > room else p for p in prompts]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stop = stop_tokens(model, tokenizer)
    sampling = temperature > 0
    rows = [i for i in range(len(prompts)) for _ in range(samples)]
    order = sorted(range(len(rows)), key=lambda j: (-len(prompts[rows[j]]), j))
    fixed_shapes = uses_fixed_shapes(next(model.parameters()).dtype, sampling, fixed_shapes)
    if sampling:  # a batch per group (or prompt), its rows in `order`
        seeds = list(seeds) if seeds is not None else list(range(len(prompts)))
        if groups is not None and zero3.enabled():
            raise ValueError("generate: groups of sampled prompts are not for ZeRO-3")
        label = list(range(len(prompts))) if groups is None else list(groups)
        if len(label) != len(prompts):
            raise ValueError(f"generate: {len(label)} group labels for {len(prompts)} prompts")
        members: dict[Any, list[int]] = {}
        for j in order:  # a prompt's rows stay consecutive: same length, consecutive j
            members.setdefault(label[rows[j]], []).append(j)
        batches = [(b, len(prompts[rows[b[0]]])) for b in members.values()]
    else:
        batches = _batches(order, [len(prompts[r]) for r in rows], batch_size, fixed_shapes)
    tokens: list[list[int]] = [[] for _ in rows]
    logprobs: list[np.ndarray] = [np.zeros(0) for _ in rows]
    nll: list[np.ndarray] = [np.zeros(0) for _ in rows]
    entropy: list[np.ndarray] = [np.zeros(0) for _ in rows]
    was_training = model.training
    model.eval()
    try:
        # forward_hooks: a no-op unless the weights are partitioned (`starlora.zero3`);
        # scoring_mode: peft's LoRA layers run the scorer's fused forward (eval mode, no MC)
        with zero3.inference_mode(), zero3.forward_hooks(model), attention_kernels(device), \
                scoring_mode(model, fused=not zero3.enabled()):
            for batch, longest in tqdm(batches, desc=desc, unit="batch", disable=not progress,
                                       dynamic_ncols=True):
                ids = torch.full((len(batch), longest), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), longest), dtype=torch.long)
                for r, j in enumerate(batch):
                    p = prompts[rows[j]]
                    ids[r, longest - len(p) :] = torch.tensor(p, dtype=torch.long)
                    mask[r, longest - len(p) :] = 1
                # sampling: each prompt's K rows prefilled once, drawn from its own generator
                k = samples if sampling else 1
                generators = [torch.Generator(device).manual_seed(seeds[rows[j]])
                              for j in batch[::k]] if sampling else None
                out = decode(model, ids[::k].to(device), mask[::k].to(device),
                             max_new_tokens=max_new_tokens, stop=stop, pad=pad,
                             temperature=temperature, measure=measure,
                             compact=compact and not zero3.enabled() and not fixed_shapes,
                             synced=zero3.enabled(), repeat=k,  # equal forward counts
                             generators=generators)
                for r, j in reversed(list(enumerate(batch))):  # a filled row is a copy
                    tokens[j], logprobs[j] = out.tokens[r], out.logprobs[r]
                    if measure:
                        nll[j], entropy[j] = out.nll[r], out.entropy[r]
    finally:
        model.train(was_training)
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    return Generated(tokens, logprobs, texts, samples, nll if measure else None,
                     entropy if measure else None, room)


def sampled_group_size(samples: int, batch_size: int) -> int:
    """Prompts a caller's group of sampled prompts holds: ``batch_size // samples``, at least
    1; 1 without sampling or under ZeRO-3 (its processes must run equal batch counts)."""
    return 1 if samples < 2 or zero3.enabled() else max(1, batch_size // samples)


def uses_fixed_shapes(dtype: torch.dtype, sampling: bool, asked: bool | None = None) -> bool:
    """Whether `generate` decodes in fixed shapes (module docstring): as `asked`, by default
    when the weights' `dtype` is below fp32; never when sampling (a prompt's samples are a
    batch of their own already) or under ZeRO-3 (its processes must run as many batches as
    each other, which length-sorted shares of one size do and buckets need not)."""
    wanted = dtype not in FULL_PRECISION if asked is None else asked
    return wanted and not sampling and not zero3.enabled()


def _batches(order: list[int], lengths: list[int], batch_size: int,
             fixed: bool) -> list[tuple[list[int], int]]:
    """Rows cut into batches, as (row indices, width in tokens): `order` (longest first) in
    chunks of `batch_size`, each as wide as its longest prompt; or with `fixed` shapes, each
    row of width ``(length // BUCKET + 1) * BUCKET``, batched with rows of its width only,
    every batch `batch_size` rows, a short one filled with copies of its first row."""
    if not fixed:
        chunks = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
        return [(b, max(lengths[j] for j in b)) for b in chunks]
    width = {j: (lengths[j] // BUCKET + 1) * BUCKET for j in order}
    out = []
    for w in sorted(set(width.values()), reverse=True):
        group = [j for j in order if width[j] == w]
        for s in range(0, len(group), batch_size):
            b = group[s : s + batch_size]
            out.append((b + [b[0]] * (batch_size - len(b)), w))
    return out


@dataclass
class Decoded:
    """One decoded batch of B rows: per row the generated ids up to and including its first
    stop token, and float64 arrays of the same length (nats): `logprobs` of the (tempered)
    distribution each token was chosen from, `nll` and `entropy` of the raw logits (empty
    unless measured)."""

    tokens: list[list[int]]
    logprobs: list[np.ndarray]
    nll: list[np.ndarray]
    entropy: list[np.ndarray]


def _accepts(model: Any, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def _without_autograd(fn: Any) -> Any:
    """`fn` run under `zero3.inference_mode` (chosen per call: under ZeRO-3, weights gathered
    in inference mode would become inference tensors that training cannot use afterwards)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with zero3.inference_mode():
            return fn(*args, **kwargs)

    return wrapper


@_without_autograd
def decode(
    model: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    max_new_tokens: int,
    stop: Sequence[int],
    pad: int,
    temperature: float = 0.0,
    measure: bool = False,
    compact: bool = True,
    synced: bool = False,
    repeat: int = 1,
    generators: Sequence[torch.Generator] | None = None,
) -> Decoded:
    """Decode one left-padded batch: ids and mask [B, L] (1 = prompt token), greedy
    (``temperature == 0``) or sampled from ``softmax(logits / temperature)`` with torch's
    global generator, at most `max_new_tokens` steps, each row until its first token in
    `stop`.

    Each step takes the last position's logits in float32 [R, V] (R rows still decoding) and
    keeps only [R] numbers: the chosen token's log-probability and, with `measure`, its NLL and
    the entropy of the raw logits (``z - logsumexp(z)``, the entropy by torch's cascade sum,
    as `starlora.scoring.measures` tiles compute them).

    `compact`: a row leaves the batch (and the KV cache) once it has stopped; without it a
    finished row goes on, fed `pad`, as in ``generate``. The matmuls then run on R rows, not
    B, which on some kernels changes the last bits (docs/benchmarks.md); sampling draws from
    a [B, V] distribution whatever R is (finished rows: uniform), so the draws are
    ``generate``'s. `synced` (ZeRO-3): call the model until every process has finished, as
    ``generate(synced_gpus=True)`` does; needs ``compact=False``.

    `repeat` = K: K rows for each prompt row (B = K x the prompts' rows, ``repeat_interleave``
    order) from one prefill of each prompt, its keys and values copied K times: the rows
    decode as K repeated prompt rows would (the prefill's matmuls on fewer rows can change
    their last bits, as `compact` can). `generators` (one per prompt row): prompt i's K rows
    are drawn from ``generators[i]`` alone, a [K, V] draw a step, as torch's global generator
    seeded alike draws for that prompt alone; default: the global generator for all rows.
    """
    from transformers import DynamicCache

    if synced and compact:
        raise ValueError("decode: synced needs compact=False (every process runs every step)")
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    if not _accepts(lm, "cache"):  # without it each step would see one token and no past
        raise ValueError(f"{type(lm).__name__}: starlora decodes with a KV cache passed as "
                         "`cache` (transformers 5's argument); this model's forward takes none")
    device, B = ids.device, ids.shape[0] * repeat
    if generators is not None and len(generators) != ids.shape[0]:
        raise ValueError(f"decode: {len(generators)} generators for {ids.shape[0]} prompt rows")
    stops = torch.tensor(sorted(stop), device=device)
    kwargs: dict[str, Any] = {"use_cache": True}
    if _accepts(lm, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    position = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    if not _accepts(lm, "position_ids"):
        position = None
    attn = None if bool((mask == 1).all()) else mask  # generate drops an all-ones mask
    cache = DynamicCache(config=lm.config.get_text_config(decoder=True))
    live = torch.arange(B, device=device)  # batch rows the model runs on
    running = torch.ones(B, dtype=torch.bool, device=device)  # rows not yet stopped
    chosen, chosen_lp, nll, ent = [], [], [], []  # per step: [B] tensors
    step_ids = ids
    for _ in range(max_new_tokens):
        out = lm(input_ids=step_ids, attention_mask=attn, position_ids=position, cache=cache,
                 **kwargs)
        z = out.logits[:, -1].to(copy=True, dtype=torch.float32)  # [R, V]
        del out
        if step_ids is ids and repeat > 1:  # after the prefill: K rows per prompt row
            z = z.repeat_interleave(repeat, dim=0)
            cache.batch_repeat_interleave(repeat)
            attn = attn.repeat_interleave(repeat, dim=0) if attn is not None else None
            position = position.repeat_interleave(repeat, 0) if position is not None else None
        rows = live if compact else torch.arange(B, device=device)
        logp = z - torch.logsumexp(z, dim=-1, keepdim=True)
        if temperature > 0:
            scores = z / temperature if temperature != 1.0 else z
            probs = torch.ones(B, z.shape[-1], device=device)  # stopped rows: uniform
            probs[rows] = torch.softmax(scores, dim=-1)
            if generators is None:
                drawn = torch.multinomial(probs, num_samples=1)
            else:  # each prompt's K rows from its own generator
                drawn = torch.cat([torch.multinomial(block, 1, generator=g)
                                   for block, g in zip(probs.split(repeat), generators)])
            token = drawn[rows, 0]
            tempered = logp if temperature == 1.0 else torch.log_softmax(scores, dim=-1)
        else:
            token = torch.argmax(z, dim=-1)
            tempered = logp
        full = torch.full((B,), pad, dtype=torch.long, device=device)
        full[rows] = torch.where(running[rows], token, pad)
        chosen.append(full)
        step_lp = torch.full((B,), float("nan"), dtype=torch.float64, device=device)
        step_lp[rows] = tempered.gather(1, token[:, None])[:, 0].double()
        chosen_lp.append(step_lp)
        if measure:
            p = logp.exp()
            step_nll = torch.full_like(step_lp, float("nan"))
            step_ent = torch.full_like(step_lp, float("nan"))
            step_nll[rows] = -logp.gather(1, token[:, None])[:, 0].double()
            step_ent[rows] = (-torch.where(p > 0, p * logp, 0.0).sum(dim=-1)).double()
            nll.append(step_nll)
            ent.append(step_ent)
        running &= ~torch.isin(full, stops)
        done = not bool(running.any())
        if synced:  # every process must run the same forward passes
            flag = torch.tensor(0.0 if done else 1.0, device=device)
            torch.distributed.all_reduce(flag)
            done = float(flag) == 0.0
        if done:
            break
        if compact and not bool(running[live].all()):
            keep = running[live].nonzero()[:, 0]
            live = live[keep]
            cache.batch_select_indices(keep)
            if attn is not None:
                attn = attn[keep]
            if position is not None:
                position = position[keep]
        step_ids = full[live][:, None]
        if position is not None:
            position = position[:, -1:] + 1
        if attn is not None:
            attn = torch.cat([attn, attn.new_ones((attn.shape[0], 1))], dim=-1)
    return _rows(chosen, chosen_lp, nll, ent, stop, B)


def _rows(chosen: list[torch.Tensor], lp: list[torch.Tensor], nll: list[torch.Tensor],
          ent: list[torch.Tensor], stop: Sequence[int], B: int) -> Decoded:
    """Per-step [B] tensors -> per-row lists cut after each row's first stop token."""
    T = len(chosen)
    toks = torch.stack(chosen, 1).tolist() if T else [[] for _ in range(B)]
    lp_ = torch.stack(lp, 1).cpu().numpy() if T else np.zeros((B, 0))
    nll_ = torch.stack(nll, 1).cpu().numpy() if nll else None
    ent_ = torch.stack(ent, 1).cpu().numpy() if ent else None
    stop_set = set(stop)
    out = Decoded([], [], [], [])
    for r in range(B):
        n = next((t + 1 for t, tok in enumerate(toks[r]) if tok in stop_set), len(toks[r]))
        out.tokens.append(toks[r][:n])
        out.logprobs.append(lp_[r, :n])
        out.nll.append(nll_[r, :n] if nll_ is not None else np.zeros(0))
        out.entropy.append(ent_[r, :n] if ent_ is not None else np.zeros(0))
    return out
