"""Uncertainty scores of (prompt, answer) pairs: predictive entropy (PE) and mean token entropy (ME).

For one example with answer tokens ``a_1..a_n`` teacher-forced after its prompt:

* **PE** = sum_i -log p(a_i | prompt, a_<i)          (nats; the answer's negative log-likelihood)
* **ME** = sum_i H(p(. | prompt, a_<i))              (nats; full-vocabulary entropy per position)

plus their per-token means and ``n``. The sequence is exactly ``prompt_ids + answer_ids`` from
`Task.encode`, the one training supervises.

How it is fast: examples are sorted by length and grouped into batches of about
`max_tokens_per_batch` tokens. On CPU a batch is one row of sequences packed back to back (no
padding; attention stays inside each sequence, `_packed_attention`); elsewhere it is right-padded
rows. The decoder body runs once per batch and pass; the LM head is applied only to the hidden
states of answer positions, one tile of ``positions x vocab`` logits at a time (on CPU the
vocabulary is cut into 2048-column slices too, which run the head's matmul 2-3x faster), so
memory does not grow with sequence x vocab; `_answer_measures` merges the tiles. While
scoring, each peft LoRA layer runs `_LoraScoringForward`: the adapter's update is added into
the base output by one fused matmul, and deterministic passes merge the adapter into a
temporary weight when that costs fewer FLOPs.

Monte-Carlo dropout (`mc_passes` K > 1): the LoRA dropout on A's input (and, with
`model_dropout`, the model's own ``nn.Dropout`` modules) really samples in every pass; everything
else stays in eval mode and every module's mode is restored afterwards. Each (batch, pass) draws
its dropout masks from a seed derived from one base seed, so results are reproducible given the
torch seed. When no dropout is active (p = 0 everywhere) the K passes would be identical, so the
model runs once and the pass is repeated.

Self-check: every `score_examples` call first scores (a piece of) its shortest example both
ways, fast and with `_plain_batch` (the model's own ``forward(...).logits``, the readable
definition of PE and ME). If they disagree (an architecture that post-processes logits in a way
`_logit_transform` does not know), it warns `ScorerFallbackWarning` and scores the whole call
the plain way.

Base-model scores (`score_base`) use peft's ``disable_adapter()``, so no second model is loaded;
`BaseScoreCache` keeps them on disk, one file per model fingerprint, dtype, measures and
max_length, one record per `sequence_key` (the token ids scored, not the example id).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from starlora.errors import ConfigError, ScorerFallbackWarning
from starlora.models import cache_dir
from starlora.store import atomic_write
from starlora.tasks import Example, Task

MEASURES = ("pe", "me")
#: logits elements per tile of answer positions x vocabulary on CPU (4M fp32 = 16 MiB; two
#: alive) and on GPUs (64M = 256 MiB: a 128k vocabulary still gets 512 rows per head matmul)
CHUNK_ELEMENTS = 1 << 22
GPU_CHUNK_ELEMENTS = 1 << 26
#: LM-head columns per logits tile on CPU (`_answer_measures`): measured fastest on SmolLM2's
#: 49k vocabulary (1024-4096 tried), 2.6x faster than whole-vocabulary rows
CPU_VOCAB_TILE = 2048
#: default tokens per batch on CPU: measured fastest on SmolLM2-135M (1024-8192 tried)
CPU_TOKENS_PER_BATCH = 2048
#: default padded tokens per batch on GPUs (halved on out-of-memory)
GPU_TOKENS_PER_BATCH = 16384
#: the self-check of `score_examples` scores at most this many prompt and answer tokens each
CHECK_TOKENS = 16


# ------------------------------------------------------------------------------------------------
# results
@dataclass
class Scores:
    """Scores of N examples, aligned with `ids`. All values in nats; NaN for measures not
    computed. `pe_passes`/`me_passes` are ``[N, K]`` per-pass values when K > 1."""

    ids: list[str]
    pe: np.ndarray
    pe_mean: np.ndarray
    me: np.ndarray
    me_mean: np.ndarray
    n_answer_tokens: np.ndarray
    pe_passes: np.ndarray | None = None
    me_passes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def to_records(self) -> list[dict[str, Any]]:
        """One JSON-able dict per example; measures not computed are ``None``."""

        def num(x: float) -> float | None:
            return None if math.isnan(x) else float(x)

        records = []
        for i, id_ in enumerate(self.ids):
            rec: dict[str, Any] = {
                "id": id_,
                "pe": num(self.pe[i]),
                "pe_mean": num(self.pe_mean[i]),
                "me": num(self.me[i]),
                "me_mean": num(self.me_mean[i]),
                "n_answer_tokens": int(self.n_answer_tokens[i]),
            }
            if self.pe_passes is not None:
                rec["pe_passes"] = [num(x) for x in self.pe_passes[i]]
            if self.me_passes is not None:
                rec["me_passes"] = [num(x) for x in self.me_passes[i]]
            records.append(rec)
        return records

    @classmethod
    def from_records(cls, records: Sequence[dict[str, Any]]) -> Scores:
        def col(name: str) -> np.ndarray:
            return np.array([np.nan if r[name] is None else r[name] for r in records], np.float64)

        def passes(name: str) -> np.ndarray | None:
            if not records or name not in records[0]:
                return None
            return np.array(
                [[np.nan if x is None else x for x in r[name]] for r in records], np.float64
            )

        return cls(
            ids=[str(r["id"]) for r in records],
            pe=col("pe"),
            pe_mean=col("pe_mean"),
            me=col("me"),
            me_mean=col("me_mean"),
            n_answer_tokens=np.array([r["n_answer_tokens"] for r in records], np.int64),
            pe_passes=passes("pe_passes"),
            me_passes=passes("me_passes"),
        )

    def select(self, ids: Sequence[str]) -> Scores:
        """Scores of `ids`, in that order (KeyError for an unknown id)."""
        where = {id_: i for i, id_ in enumerate(self.ids)}
        idx = np.array([where[i] for i in ids], np.int64)
        return Scores(
            ids=[self.ids[i] for i in idx],
            pe=self.pe[idx],
            pe_mean=self.pe_mean[idx],
            me=self.me[idx],
            me_mean=self.me_mean[idx],
            n_answer_tokens=self.n_answer_tokens[idx],
            pe_passes=None if self.pe_passes is None else self.pe_passes[idx],
            me_passes=None if self.me_passes is None else self.me_passes[idx],
        )


# ------------------------------------------------------------------------------------------------
# model plumbing
def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers ``*ForCausalLM`` inside a peft wrapper (or `model` itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder body returning final hidden states, LM head) of a causal LM; with peft, the
    LoRA layers live inside these modules, so calling them applies (or skips) the adapter."""
    lm = _unwrap(model)
    body = getattr(lm, "base_model", None)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if body is None or body is lm or head is None:
        raise ConfigError(f"scoring: {type(lm).__name__} is not a causal LM with an LM head")
    return body, head


def _logit_transform(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Post-head logit processing some architectures do in their ``forward`` (Gemma 2/3
    soft-capping, Cohere's scale, Granite's division by ``logits_scaling``); None for Llama,
    Qwen2, GPT-2 and most others. Others are caught by the self-check of `score_examples`."""
    config = _unwrap(model).config
    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    divide = None  # other model types' logits_scaling means something else (a multiplier)
    if str(getattr(config, "model_type", "")).startswith("granite"):
        divide = getattr(config, "logits_scaling", None)
    if not cap and not scale and divide in (None, 1):
        return None

    def transform(z: torch.Tensor) -> torch.Tensor:
        if scale:
            z = z * scale
        if divide not in (None, 1):
            z = z / divide
        if cap:
            z = torch.tanh(z / cap) * cap
        return z

    return transform


def _max_positions(model: nn.Module) -> int | None:
    config = _unwrap(model).config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class _MaskSampler:
    """Dropout on the input of LoRA A for the MC passes of `_LoraScoringForward`.

    ``project(x, A, p)`` returns ``(h, gain)`` with ``h = (x * keep) @ A.T`` and ``keep`` a fresh
    0/1 mask of x's shape that keeps each element with probability 1 - p; ``gain`` =
    1 / (1 - p) is folded into the LoRA scaling by the caller (one elementwise pass fewer than
    ``nn.Dropout``).

    On CPU, torch's Mersenne Twister costs ~9 ns an element, more than the LoRA matmuls it feeds,
    and each elementwise pass over a large activation is bound by memory bandwidth. Here a NumPy
    SFC64 stream gives four 16-bit lanes per 64-bit draw (an element is dropped when its lane is
    below ``round(p * 2^16)``, so the drop rate is p rounded to 1/65536 and the gain is exact for
    it), and the rows are masked and projected a block at a time so that the mask and the masked
    copy stay in cache. On other devices torch's own dropout (Philox on CUDA) is used.
    `reseed` is called once per (batch, pass), which makes scores reproducible.
    """

    block_elements = 1 << 17  # elements of x masked at a time (~0.75 MiB of lanes + mask)

    def __init__(self, device: torch.device):
        self.cpu = device.type == "cpu"
        self._gen = np.random.SFC64(0)

    def reseed(self, seed: int) -> None:
        self._gen = np.random.SFC64(seed)

    def project(
        self, x: torch.Tensor, weight: torch.Tensor, p: float
    ) -> tuple[torch.Tensor, float]:
        """x [rows, d_in], weight [r, d_in] -> (h [rows, r], gain)."""
        if not self.cpu:
            return nn.functional.linear(nn.functional.dropout(x, p, training=True), weight), 1.0
        dropped = min(round(p * 65536), 65535)  # of 65536 lane values
        if dropped == 0:
            return nn.functional.linear(x, weight), 1.0
        cut = dropped - 32768  # keep where the signed lane >= cut
        h = x.new_empty(x.shape[0], weight.shape[0])
        step = max(1, self.block_elements // x.shape[1])
        buffer = x.new_empty(min(step, x.shape[0]), x.shape[1])
        for s in range(0, x.shape[0], step):
            xs = x[s : s + step]
            n = xs.numel()
            lanes = torch.from_numpy(self._gen.random_raw((n + 3) // 4).view(np.int16)[:n])
            keep = torch.ge(lanes.view(xs.shape), cut, out=buffer[: xs.shape[0]])  # 0/1 in x.dtype
            torch.mm(keep.mul_(xs), weight.t(), out=h[s : s + step])
        return h, 65536 / (65536 - dropped)


class _LoraScoringForward:
    """The ``forward`` of one peft LoRA ``Linear`` while it scores (installed by `scoring_mode`).

    Computes what peft computes, ``base(x) + scaling * B(A(dropout(x)))``, with less traffic:

    * the scaled LoRA update is accumulated into the base output by one in-place ``addmm_``
      (peft: a matmul, then a scaled copy, then an added copy);
    * MC passes (`sampler` given) mask A's input with `_MaskSampler` and fold 1 / (1 - p) into
      the addmm's alpha;
    * deterministic passes with fp32/fp64 weights and more than ``d_in*d_out/(d_in+d_out)``
      rows merge the adapter into a temporary weight (``W + scaling * B @ A``, one matmul),
      which costs fewer FLOPs than the two LoRA matmuls over the rows.

    Anything else (an adapter disabled or merged, a LoRA variant such as DoRA, a LoRA bias,
    mixed dtypes, per-call adapter names) goes through peft's own forward.
    """

    def __init__(self, layer: nn.Module, sampler: _MaskSampler | None):
        self.layer = layer
        self.original = layer.forward  # bound method of the class
        self.sampler = sampler

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        layer = self.layer
        adapters = [a for a in layer.active_adapters if a in layer.lora_A]
        if (
            kwargs
            or layer.disable_adapters
            or layer.merged
            or any(a in layer.lora_variant or layer.lora_B[a].bias is not None for a in adapters)
            or any(layer.lora_A[a].weight.dtype != x.dtype for a in adapters)
        ):
            return self.original(x, *args, **kwargs)
        base = layer.base_layer
        d_in = x.shape[-1]
        x2 = x.reshape(-1, d_in)
        if self.sampler is None and type(base) is nn.Linear and base.weight.dtype in _MERGE_DTYPES:
            d_out = base.weight.shape[0]
            if x2.shape[0] * (d_in + d_out) > d_in * d_out:
                weight = base.weight
                for a in adapters:
                    weight = torch.addmm(
                        weight, layer.lora_B[a].weight, layer.lora_A[a].weight, alpha=layer.scaling[a]
                    )
                return nn.functional.linear(x, weight, base.bias)
        y = base(x, *args)
        if y.dtype != x.dtype or not y.is_contiguous():
            return self.original(x, *args, **kwargs)
        y2 = y.view(-1, y.shape[-1])
        for a in adapters:
            A, B, alpha = layer.lora_A[a].weight, layer.lora_B[a].weight, layer.scaling[a]
            p = getattr(layer.lora_dropout[a], "p", 0.0)
            if self.sampler is not None and p > 0:
                h, gain = self.sampler.project(x2, A, p)
                alpha *= gain
            else:
                h = nn.functional.linear(x2, A)
            y2.addmm_(h, B.t(), alpha=alpha)
        return y


_MERGE_DTYPES = (torch.float32, torch.float64)  # bf16/fp16 would round the low-rank update away


def _lora_linears(model: nn.Module) -> list[nn.Module]:
    """peft LoRA ``Linear`` layers that `_LoraScoringForward` may run: not those whose forward
    is already wrapped (accelerate's offloading hooks, for one), which keep theirs."""
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:  # pragma: no cover - peft is a dependency
        return []
    return [
        m
        for m in model.modules()
        if type(m) is Linear and "forward" not in vars(m) and not hasattr(m, "_hf_hook")
    ]


def _sampled_dropouts(model: nn.Module, model_dropout: bool) -> list[nn.Dropout]:
    """Dropout modules with p > 0 that MC dropout samples: those in peft's ``lora_dropout``
    ModuleDicts and, with `model_dropout`, the model's own."""
    lora = {
        id(d)
        for m in model.modules()
        if isinstance(d := getattr(m, "lora_dropout", None), nn.ModuleDict)
    }
    return [
        child
        for parent in model.modules()
        for child in parent.children()
        if isinstance(child, nn.Dropout) and child.p > 0 and (model_dropout or id(parent) in lora)
    ]


@contextlib.contextmanager
def scoring_mode(
    model: nn.Module,
    mc_dropout: bool = False,
    model_dropout: bool = False,
    sampler: _MaskSampler | None = None,
    fused: bool = True,
) -> Iterator[bool]:
    """Eval mode for the whole model, except the dropout modules MC dropout samples (when
    `mc_dropout`), which are put in train mode. With `fused`, every peft LoRA ``Linear`` runs a
    `_LoraScoringForward` meanwhile (its masks come from `sampler` when `mc_dropout`).
    Restores every module's forward and previous ``training`` flag on exit, also on an
    exception. Yields whether any dropout is active."""
    saved = [(m, m.training) for m in model.modules()]
    patched: list[nn.Module] = []
    try:
        model.eval()
        sampled = _sampled_dropouts(model, model_dropout) if mc_dropout else []
        for d in sampled:
            d.train()
        if sampled:
            # peft's LoRA variants (DoRA) apply the dropout only while the layer itself trains
            for layer in model.modules():
                if getattr(layer, "lora_variant", None):
                    layer.training = True  # this flag only, not its base layer's
        if mc_dropout and sampler is None:
            sampler = _MaskSampler(next(model.parameters()).device)
        for layer in _lora_linears(model) if fused else []:
            layer.forward = _LoraScoringForward(layer, sampler if sampled else None)
            patched.append(layer)
        yield bool(sampled)
    finally:
        for layer in patched:
            del layer.forward  # the class's forward shows through again
        for m, flag in saved:
            m.training = flag


def _adapter_disabled(model: nn.Module) -> contextlib.AbstractContextManager:
    """peft's ``disable_adapter()`` for a PeftModel; nothing to do for a plain model."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return contextlib.nullcontext()
    return model.disable_adapter() if isinstance(model, PeftModel) else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------
# batching
def _fit(
    prompt: list[int], answer: list[int], max_length: int | None
) -> tuple[list[int], list[int]]:
    """Cut a too-long pair to `max_length` tokens: the prompt loses tokens on the left (at
    least one is kept), then, if still too long, the answer loses tokens on the right."""
    if max_length is None or len(prompt) + len(answer) <= max_length:
        return prompt, answer
    keep = max(1, max_length - len(answer))
    prompt = prompt[-keep:]
    return prompt, answer[: max_length - len(prompt)]


def _encode(
    model: nn.Module, tokenizer: Any, task: Task, examples: Sequence[Example],
    max_length: int | None,
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) each example is scored on; max_length default: the model's."""
    max_length = max_length or _max_positions(model)
    return [_fit(*task.encode(tokenizer, ex), max_length) for ex in examples]


def _batch_end(
    lengths: np.ndarray,
    order: np.ndarray,
    start: int,
    limit: int,
    by_tokens: bool,
    max_padding: float,
    packed: bool = False,
) -> int:
    """End (exclusive, into `order`) of the batch that starts at `start`: at most `limit`
    tokens (`by_tokens`; padded tokens, or real ones when `packed`) or examples, and, padded,
    at most a `max_padding` fraction of padding. `order` sorts examples by decreasing length,
    so the first one sets the padded length."""
    longest = int(lengths[order[start]])
    end, useful = start + 1, longest
    while end < len(order):
        n = int(lengths[order[end]])
        if not by_tokens:
            fits = end - start < limit
        elif packed:
            fits = useful + n <= limit
        else:
            fits = (end + 1 - start) * longest <= limit
        if not fits or (not packed and 1 - (useful + n) / ((end + 1 - start) * longest) > max_padding):
            break
        useful += n
        end += 1
    return end


#: name under which `_packed_attention` is registered with transformers' AttentionInterface
PACKED_ATTENTION = "starlora_packed_sdpa"
#: lengths of the sequences packed into the current one-row batch, read by `_packed_attention`
_PACKED_LENGTHS: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "starlora_packed_lengths", default=None
)


def _packed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal SDPA inside each sequence of a packed row: query/key/value ``[1, heads, sum(L),
    head_dim]`` are cut at the lengths in `_PACKED_LENGTHS`; returns ``[1, sum(L), heads,
    head_dim]`` as transformers' ``sdpa_attention_forward`` does. No padding is computed and no
    mask is built: each piece runs SDPA's causal kernel."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lengths = _PACKED_LENGTHS.get()
    if lengths is None or query.shape[0] != 1 or sum(lengths) != query.shape[2]:
        raise RuntimeError(f"{PACKED_ATTENTION}: called outside a packed scoring batch")
    out, start = [], 0
    for n in lengths:
        piece = slice(start, start + n)
        o, _ = sdpa_attention_forward(
            module, query[:, :, piece], key[:, :, piece], value[:, :, piece], None, **kwargs
        )
        out.append(o)
        start += n
    return torch.cat(out, dim=1), None


def _can_pack(model: nn.Module, longest: int) -> bool:
    """Whether `model` runs packed batches exactly: its attention is transformers' SDPA (which
    `_packed_attention` calls per sequence) and no sequence is longer than a sliding window."""
    config = _unwrap(model).config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and longest > window:
        return False
    try:
        from transformers import AttentionInterface
    except ImportError:  # pragma: no cover - transformers < 4.48
        return False
    AttentionInterface.register(PACKED_ATTENTION, _packed_attention)  # idempotent
    return True


@contextlib.contextmanager
def _packed(model: nn.Module, lengths: list[int]) -> Iterator[None]:
    """Run `model` with `_packed_attention` on a row that packs sequences of `lengths`."""
    config = _unwrap(model).config
    previous = config._attn_implementation
    token = _PACKED_LENGTHS.set(lengths)
    config._attn_implementation = PACKED_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous
        _PACKED_LENGTHS.reset(token)


def _batch_inputs(
    seqs: list[tuple[list[int], list[int]]], pad_id: int, packed: bool
) -> tuple[dict[str, np.ndarray | None], np.ndarray, np.ndarray, np.ndarray]:
    """Model inputs of one batch and where its answers are.

    Packed: one row ``[1, sum(L)]`` holding the sequences back to back, positions restarting at
    0 for each, no attention mask. Padded: ``[B, max(L)]`` right-padded with a mask; real tokens
    sit at positions 0..len-1 in every architecture either way.

    Returns (inputs: input_ids, position_ids, attention_mask (None when packed);
    flat [P]: index of each answer position's hidden state in the flattened ``[rows * T]``
    output; targets [P]: the answer token it predicts; owner [P]: its sequence's index in seqs).
    """
    lengths = np.array([len(p) + len(a) for p, a in seqs], np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if packed else None
    width = int(lengths.sum()) if packed else int(lengths.max())
    rows = 1 if packed else len(seqs)
    ids = np.full((rows, width), pad_id, np.int64)
    positions = np.zeros((rows, width), np.int64) if packed else np.tile(np.arange(width), (rows, 1))
    flat, targets, owner = [], [], []
    for j, (p, a) in enumerate(seqs):
        row, offset = (0, int(starts[j])) if packed else (j, 0)
        n = len(p) + len(a)
        ids[row, offset : offset + n] = p + a
        if packed:
            positions[row, offset : offset + n] = np.arange(n)
        # the hidden state at position t predicts token t + 1
        flat.append(row * width + offset + np.arange(len(p) - 1, n - 1))
        targets.append(np.asarray(a, np.int64))
        owner.append(np.full(len(a), j))
    mask = None
    if not packed:
        mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    inputs = {"input_ids": ids, "position_ids": positions, "attention_mask": mask}
    return inputs, np.concatenate(flat), np.concatenate(targets), np.concatenate(owner)


def _answer_measures(
    hidden: torch.Tensor,
    head: nn.Module,
    targets: torch.Tensor,
    transform: Callable[[torch.Tensor], torch.Tensor] | None,
    want_me: bool,
    vocab_tile: int | None,
    max_elements: int = CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-log p(target) and the entropy of the next-token distribution at P answer positions.

    hidden [P, H] final hidden states, targets [P] token ids -> (nll [P], entropy [P]) float64
    nats on the CPU (entropy NaN unless `want_me`). The logits are made one tile of ``rows x
    vocab_tile`` at a time (`vocab_tile` None: the whole vocabulary, and any head module), so
    at most `max_elements` of them are alive. Each tile keeps, per row, its max ``m``, ``S = sum
    e^(z - m)`` and ``D = sum e^(z - m) (m - z)``; the tiles are merged in float64 at the end:
    with ``M = max m`` and ``f = e^(m - M)``, ``log Z = M + log sum f S`` and
    ``H = log sum f S + sum f (D + S (M - m)) / sum f S``. Every term is >= 0, so nothing
    cancels; `torch.sum` is a cascade sum (a matmul dot over a 49k vocabulary drifts ~1e-4 in
    fp32, this ~1e-7).

    Why tiles of the vocabulary: on CPU a ``[P, H] x [H, 49k]`` product ran at 40-50% of the
    rate of the same FLOPs in 2048-column slices of the head, whose weights and outputs stay
    in cache (SmolLM2, 2 cores).
    """
    P = hidden.shape[0]
    weight, bias = getattr(head, "weight", None), getattr(head, "bias", None)
    V = getattr(head, "out_features", None)
    if V is None and isinstance(weight, torch.Tensor):
        V = weight.shape[0]
    if V is not None and P and int(targets.max()) >= V:
        raise ConfigError(
            f"scoring: token id {int(targets.max())} is outside the LM head's {V} outputs "
            "(does the tokenizer belong to this model?)"
        )
    if vocab_tile is None or type(head) is not nn.Linear or V is None or vocab_tile >= V:
        tiles: list[tuple[int, int] | None] = [None]
        width = V or 1 << 16
    else:
        tiles = [(v0, min(V, v0 + vocab_tile)) for v0 in range(0, V, vocab_tile)]
        width = vocab_tile
    rows = max(1, max_elements // width)
    n, dev = len(tiles), hidden.device
    m = torch.empty(P, n, device=dev)
    S = torch.empty(P, n, device=dev)
    D = torch.zeros(P, n, device=dev)
    y_t = torch.empty(P, device=dev)  # z - m of the target, in the tile that holds it
    tile_t = targets // width if tiles[0] is not None else torch.zeros_like(targets)
    for c, tile in enumerate(tiles):
        v0 = 0 if tile is None else tile[0]
        for s in range(0, P, rows):
            h = hidden[s : s + rows]
            if tile is None:
                z = head(h).float()  # [R, V]
            else:
                b = None if bias is None else bias[tile[0] : tile[1]]
                z = nn.functional.linear(h, weight[tile[0] : tile[1]], b).float()  # [R, w]
            if transform is not None:
                z = transform(z)
            mc = z.amax(dim=-1, keepdim=True)
            z -= mc  # y = z - m <= 0, in place
            local = (targets[s : s + rows] - v0).clamp_(0, z.shape[1] - 1)
            mine = tile_t[s : s + rows] == c
            picked = z.gather(1, local[:, None])[:, 0]
            y_t[s : s + rows] = torch.where(mine, picked, y_t[s : s + rows])
            m[s : s + rows, c] = mc[:, 0]
            if want_me:
                e = z.exp()
                S[s : s + rows, c] = e.sum(dim=-1)
                D[s : s + rows, c] = e.mul_(z).sum(dim=-1).neg_()
                del e
            else:
                S[s : s + rows, c] = z.exp_().sum(dim=-1)
            del z
    # the merge: [P, tiles] numbers, in float64 on the CPU (MPS has no float64)
    m, S, D, y_t = (t.to("cpu", torch.float64) for t in (m, S, D, y_t))
    M = m.amax(dim=-1, keepdim=True)  # [P, 1]
    f = (m - M).exp_()
    total = (f * S).sum(dim=-1)  # Z e^-M
    log_s = total.log()
    nll = log_s + (M[:, 0] - m.gather(1, tile_t.cpu()[:, None])[:, 0]) - y_t
    if not want_me:
        return nll, torch.full_like(nll, math.nan)
    return nll, log_s + (f * (D + S * (M - m))).sum(dim=-1) / total


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
    sampler: _MaskSampler,
    packed: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-position NLL and entropy of one batch, for each pass (pass k reseeds torch and
    `sampler` with ``seeds[k]``).

    Returns (owner [P] int: index of the example in `seqs` of each answer position,
    nll [K, P] float64, entropy [K, P] float64), P = total answer tokens of the batch,
    K = len(seeds) or 1 (deterministic).
    """
    arrays, flat, targets, owner = _batch_inputs(seqs, pad_id, packed)
    inputs = {k: None if v is None else torch.from_numpy(v).to(device) for k, v in arrays.items()}
    flat_t = torch.from_numpy(flat).to(device)
    tgt_t = torch.from_numpy(targets).to(device)
    P = len(owner)
    lengths = [len(p) + len(a) for p, a in seqs]
    cpu = device.type == "cpu"
    vocab_tile, max_elements = (CPU_VOCAB_TILE, CHUNK_ELEMENTS) if cpu else (None, GPU_CHUNK_ELEMENTS)

    passes = seeds if seeds is not None else [None]
    nll = np.full((len(passes), P), np.nan)
    ent = np.full((len(passes), P), np.nan)
    for k, seed in enumerate(passes):
        if seed is not None:
            torch.manual_seed(seed)  # dropouts peft runs itself (fallback layers, the model's own)
            sampler.reseed(seed)
        with _packed(model, lengths) if packed else contextlib.nullcontext():
            out = body(**inputs, use_cache=False)[0]  # [rows, T, H]
        hidden = out.reshape(-1, out.shape[-1])[flat_t]  # [P, H], only answer positions
        del out
        nll_k, ent_k = _answer_measures(
            hidden, head, tgt_t, transform, want_me, vocab_tile, max_elements
        )
        if want_pe:
            nll[k] = nll_k.numpy()
        if want_me:
            ent[k] = ent_k.numpy()
    return owner, nll, ent


def _plain_batch(
    model: nn.Module,
    seqs: list[tuple[list[int], list[int]]],
    pad_id: int,
    device: torch.device,
    seeds: list[int] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The definition of PE and ME, and the path scoring falls back to: right-padded rows
    through the model's own ``forward(...).logits`` (LoRA layers as peft runs them; pass k
    seeds torch's dropout with ``seeds[k]``), log-softmax in float64 at the answer positions
    (`CHUNK_ELEMENTS` at a time). Returns what `_score_batch` returns: owner [P], nll [K, P],
    entropy [K, P] (nats)."""
    arrays, flat, targets, owner = _batch_inputs(seqs, pad_id, packed=False)
    inputs = {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}  # ids, positions, mask
    flat_t, tgt_t = (torch.from_numpy(a).to(device) for a in (flat, targets[:, None]))
    passes = seeds if seeds is not None else [None]
    nll, ent = np.empty((len(passes), len(owner))), np.empty((len(passes), len(owner)))
    for k, seed in enumerate(passes):
        if seed is not None:
            torch.manual_seed(seed)
        logits = model(**inputs, use_cache=False).logits  # [B, T, V]
        z = logits.reshape(-1, logits.shape[-1])[flat_t]  # [P, V]: answer positions
        if z.device.type == "mps":  # no float64 there
            z, tgt_t = z.cpu(), tgt_t.cpu()
        rows = max(1, CHUNK_ELEMENTS // z.shape[1])
        for s in range(0, z.shape[0], rows):
            logp = z[s : s + rows].double().log_softmax(-1)
            nll[k, s : s + rows] = -logp.gather(1, tgt_t[s : s + rows])[:, 0].cpu().numpy()
            ent[k, s : s + rows] = -(logp.exp() * logp).sum(-1).cpu().numpy()
    return owner, nll, ent


def _fast_path_disagreement(
    model: nn.Module,
    body: nn.Module,
    head: nn.Module,
    transform: Callable[[torch.Tensor], torch.Tensor] | None,
    seq: tuple[list[int], list[int]],
    pad_id: int,
    device: torch.device,
    packed: bool,
) -> str | None:
    """Score `seq` deterministically (no dropout, the adapter as it is) with the fast path and
    with `_plain_batch`; None when PE and ME agree within ``tol * max(1, |plain|)``, tol =
    1e-4 for float32/float64 weights and 2e-2 for bf16/fp16 ones (their logits are rounded
    to ~3 digits), else the warning. Two forward passes of one sequence; draws no random
    numbers."""
    with scoring_mode(model), torch.inference_mode():
        fast = _score_batch(model, body, head, transform, [seq], pad_id, device, True, True,
                            None, _MaskSampler(device), packed)
    with scoring_mode(model, fused=False), torch.inference_mode():
        plain = _plain_batch(model, [seq], pad_id, device, None)
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
    return (f"{type(_unwrap(model)).__name__}: the fast scorer disagrees with "
            f"model.forward(...).logits ({', '.join(bad)}); scoring with the plain forward path")


# ------------------------------------------------------------------------------------------------
# public API
def sequence_key(prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> str:
    """Identity of one scored sequence for `BaseScoreCache`: 32 hex digits of the sha256 of
    the prompt and answer token ids (after cutting to max_length), the boundary included."""
    blob = json.dumps([[int(t) for t in prompt_ids], [int(t) for t in answer_ids]])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def score_examples(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    *,
    measures: Sequence[str] = MEASURES,
    mc_passes: int = 1,
    model_dropout: bool = False,
    batch_size: int | str = "auto",
    max_tokens_per_batch: int | None = None,
    max_length: int | None = None,
    progress: bool = True,
    desc: str = "scoring",
    seed: int | None = None,
    max_padding: float | None = None,
    packed: bool | None = None,
) -> Scores:
    """PE and ME of every example's gold answer under `model` (plain or peft), teacher-forced.

    Args:
        measures: any of ``"pe"``, ``"me"``; the others come back as NaN and are not computed.
        mc_passes: K; with K > 1 the LoRA dropout (and the model's own dropout when
            `model_dropout`) samples a fresh mask per pass; scores are the mean over passes and
            ``pe_passes``/``me_passes`` hold the ``[N, K]`` per-pass values.
        batch_size: examples per batch, or ``"auto"``: as many as fit `max_tokens_per_batch`
            tokens (padded tokens in padded batches). Either way the limit halves on
            out-of-memory.
        max_tokens_per_batch: default 2048 on CPU, where larger batches only fall out of the
            cache, and 16384 on GPUs.
        max_length: prompt + answer tokens; longer prompts are cut on the left. Default: the
            model's maximum position count.
        packed: put each batch's sequences back to back in one row (no padding; attention
            stays within each sequence, see `_packed_attention`). Default: on CPU, where padding
            is pure waste, for models whose attention is transformers' SDPA without a sliding
            window; padded batches otherwise.
        max_padding: padded batches only: the largest fraction of padding tokens a batch may
            hold. Default 0.1 on CPU, 0.5 on GPUs.
        seed: base seed of the dropout masks; default: drawn from torch's global generator
            (so ``torch.manual_seed`` makes scoring reproducible).

    Self-check: the shortest example with an answer, cut to the last `CHECK_TOKENS` prompt and
    first `CHECK_TOKENS` answer tokens, is first scored deterministically both by the fast path
    and by `_plain_batch`, the model's own ``forward(...).logits``. If PE or ME
    differ by more than ``1e-4 * max(1, |plain|)`` (float32/float64 weights; ``2e-2 *`` for
    bf16/fp16 weights, whose logits carry ~3 digits), a `ScorerFallbackWarning` names the
    model class and the whole call runs `_plain_batch` on padded batches (`packed` ignored;
    MC passes then sample peft's dropout with torch's generator, seeded per batch and pass).
    The check draws no random numbers and leaves the scores of an agreeing model unchanged.
    """
    measures = tuple(measures)
    unknown = set(measures) - set(MEASURES)
    if unknown or not measures:
        raise ConfigError(f"scoring.measures: expected some of {MEASURES}, got {measures}")
    if mc_passes < 1:
        raise ConfigError(f"scoring.mc_passes: must be >= 1, got {mc_passes}")
    by_tokens = batch_size == "auto"
    if not by_tokens and not (isinstance(batch_size, int) and batch_size > 0):
        raise ConfigError(
            f"scoring.batch_size: must be 'auto' or a positive int, got {batch_size!r}"
        )
    body, head = _body_and_head(model)
    transform = _logit_transform(model)
    device = next(model.parameters()).device
    if max_tokens_per_batch is None:
        max_tokens_per_batch = (
            CPU_TOKENS_PER_BATCH if device.type == "cpu" else GPU_TOKENS_PER_BATCH
        )
    limit = max_tokens_per_batch if by_tokens else int(batch_size)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if max_padding is None:
        max_padding = 0.1 if device.type == "cpu" else 0.5
    seqs = _encode(model, tokenizer, task, examples, max_length)
    lengths = np.array([len(p) + len(a) for p, a in seqs], np.int64)
    n_tok = np.array([len(a) for _, a in seqs], np.int64)
    order = np.argsort(-lengths, kind="stable")  # longest first: an OOM shows up at once
    longest = int(lengths.max(initial=0))
    if packed is None:
        packed = device.type == "cpu" and _can_pack(model, longest)
    elif packed and not _can_pack(model, longest):
        raise ConfigError(
            "scoring: packed batches need a model with SDPA attention and sequences no longer "
            "than its sliding window"
        )
    check = next((int(i) for i in order[::-1] if n_tok[i] > 0), None)  # the shortest
    problem = None if check is None else _fast_path_disagreement(
        model, body, head, transform,
        (seqs[check][0][-CHECK_TOKENS:], seqs[check][1][:CHECK_TOKENS]), pad_id, device, packed,
    )
    if problem is not None:
        warnings.warn(problem, ScorerFallbackWarning, stacklevel=2)
        packed = False

    N, K = len(examples), mc_passes
    pe = np.full((N, K), np.nan)
    me = np.full((N, K), np.nan)
    want_pe, want_me = "pe" in measures, "me" in measures

    from tqdm.auto import tqdm

    bar = tqdm(total=N, desc=desc, unit="ex", disable=not progress, dynamic_ncols=True)
    fork_devices = [device] if device.type == "cuda" else []
    sampler = _MaskSampler(device)
    with contextlib.ExitStack() as stack:
        stochastic = stack.enter_context(
            scoring_mode(model, K > 1, model_dropout, sampler, fused=problem is None)
        )
        if stochastic and seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        stack.enter_context(torch.random.fork_rng(devices=fork_devices, enabled=stochastic))
        stack.enter_context(torch.inference_mode())
        start = 0
        while start < N:
            end = _batch_end(lengths, order, start, limit, by_tokens, max_padding, packed)
            idx = order[start:end]
            # one seed per (batch start, pass): reproducible given the base seed
            seeds = [seed + 1_000_003 * start + k for k in range(K)] if stochastic else None
            batch = [seqs[i] for i in idx]
            try:
                if problem is not None:
                    owner, nll, ent = _plain_batch(model, batch, pad_id, device, seeds)
                else:
                    owner, nll, ent = _score_batch(model, body, head, transform, batch, pad_id,
                                                   device, want_pe, want_me, seeds, sampler,
                                                   packed)
            except torch.OutOfMemoryError:
                if end - start == 1:
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
        pe_mean=pe_avg / denom,
        me=me_avg,
        me_mean=me_avg / denom,
        n_answer_tokens=n_tok,
        pe_passes=pe if K > 1 else None,
        me_passes=me if K > 1 else None,
    )


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
    model's weights and dtype (`base_cache_key`); examples are matched by the tokens scored."""
    kwargs = {**kwargs, "mc_passes": 1}
    kwargs.setdefault("desc", "scoring base")

    def compute(chunk: list[Example]) -> Scores:
        with _adapter_disabled(model):
            return score_examples(model, tokenizer, task, chunk, **kwargs)

    if cache is None:
        return compute(list(examples))
    seqs = _encode(model, tokenizer, task, examples, kwargs.get("max_length"))
    return cache.get_or_compute(examples, [sequence_key(p, a) for p, a in seqs], compute)


# ------------------------------------------------------------------------------------------------
# base-score cache
def default_score_cache_dir() -> Path:
    """``<starlora cache>/scores``, shared by all runs of this user."""
    return cache_dir() / "scores"


def base_cache_key(
    fingerprint: str,
    *,
    measures: Sequence[str] = MEASURES,
    dtype: torch.dtype,
    max_length: int | None = None,
) -> dict[str, Any]:
    """The key of one base-score cache file: what, besides the tokens of each example (its
    `sequence_key`), changes base scores. `fingerprint`: `starlora.models.model_fingerprint` of
    the weights; `dtype`: the model's parameter dtype (not "auto"). A model without a
    fingerprint ("") cannot be cached (ConfigError): it would share a key with others."""
    if not fingerprint:
        raise ConfigError("base-score cache: the model has no fingerprint of its weights")
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"base-score cache: dtype must be a torch.dtype, got {dtype!r}")
    return {
        "version": 2,  # 1 keyed records by example id: never read again
        "model": fingerprint,
        "dtype": str(dtype),
        "measures": sorted(measures),
        "max_length": max_length,
    }


class BaseScoreCache:
    """Base-model scores on disk, one JSON record per scored sequence (its `sequence_key`).

    Lives in `directory` as ``<sha of key>.jsonl`` next to ``<sha of key>.key.json`` holding
    the key for humans. Records are appended chunk by chunk while computing (so an interrupted
    computation resumes), under a `filelock.FileLock` on ``<sha of key>.jsonl.lock``: runs in
    parallel share the file. Readers take no lock and never write; they skip a last line that
    is torn (being appended, or left by a crash). A writer, holding the lock, first cuts such
    a tail (nobody else is writing then, so it is a crashed writer's).
    """

    def __init__(self, directory: str | Path, key: dict[str, Any], chunk_size: int = 256):
        self.directory = Path(directory)
        self.key = dict(key)
        digest = hashlib.sha256(
            json.dumps(self.key, sort_keys=True, default=str).encode()
        ).hexdigest()[:20]
        self.path = self.directory / f"{digest}.jsonl"
        self.key_path = self.directory / f"{digest}.key.json"
        self.lock_path = self.directory / f"{digest}.jsonl.lock"
        self.chunk_size = chunk_size
        self.computed = 0  # sequences computed (not found) by the last get_or_compute

    def load(self) -> dict[str, dict[str, Any]]:
        """Records on disk by sequence key. Reads only: a line without its newline (torn) or
        that does not parse is skipped."""
        if not self.path.is_file():
            return {}
        records: dict[str, dict[str, Any]] = {}
        for line in self.path.read_bytes().splitlines(keepends=True):
            if line.endswith(b"\n"):
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    rec = json.loads(line)
                    records[rec["key"]] = rec
        return records

    def _append(self, records: list[dict[str, Any]]) -> None:
        blob = "".join(json.dumps(r) + "\n" for r in records).encode()
        from filelock import FileLock

        with FileLock(self.lock_path), open(self.path, "a+b") as f:
            end = f.seek(0, os.SEEK_END)
            if end:
                f.seek(end - 1)
                if f.read(1) != b"\n":  # a crashed writer's torn last line: cut it
                    f.seek(0)
                    f.truncate(f.read().rfind(b"\n") + 1)
            f.write(blob)  # O_APPEND: at the end; one write per chunk
            f.flush()
            os.fsync(f.fileno())

    def get_or_compute(
        self,
        examples: Sequence[Example],
        keys: Sequence[str],
        compute: Callable[[list[Example]], Scores],
    ) -> Scores:
        """Scores of `examples` (in order; `keys`: their `sequence_key`s), computing only the
        sequences not on disk yet, each once. Before each chunk the file is read again, so
        sequences another process wrote meanwhile are not computed twice."""
        if len(keys) != len(examples):
            raise ValueError(f"{len(keys)} keys for {len(examples)} examples")
        have = self.load()
        missing: dict[str, Example] = {}  # the first example of each key not on disk
        for ex, k in zip(examples, keys):
            if k not in have:
                missing.setdefault(k, ex)
        todo = list(missing.items())
        self.computed = 0
        if todo:
            self.directory.mkdir(parents=True, exist_ok=True)
            if not self.key_path.is_file():
                atomic_write(self.key_path, json.dumps(self.key, indent=2, default=str).encode())
        for s in range(0, len(todo), self.chunk_size):
            if s:
                have.update(self.load())
            chunk = [(k, ex) for k, ex in todo[s : s + self.chunk_size] if k not in have]
            if not chunk:
                continue
            scores = compute([ex for _, ex in chunk]).to_records()
            records = [{"key": k, **r} for (k, _), r in zip(chunk, scores)]
            self._append(records)
            self.computed += len(chunk)
            have.update((r["key"], r) for r in records)
        return Scores.from_records([{**have[k], "id": ex.id} for ex, k in zip(examples, keys)])
