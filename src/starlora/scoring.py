"""Uncertainty scores of (prompt, answer) pairs: predictive entropy (PE) and mean token entropy (ME).

For one example with answer tokens ``a_1..a_n`` teacher-forced after its prompt:

* **PE** = sum_i -log p(a_i | prompt, a_<i)          (nats; the answer's negative log-likelihood)
* **ME** = sum_i H(p(. | prompt, a_<i))              (nats; full-vocabulary entropy per position)

plus their per-token means and ``n``. The sequence is exactly ``prompt_ids + answer_ids`` from
`Task.encode`, the one training supervises.

How it is fast: examples are sorted by length and packed into right-padded batches of about
`max_tokens_per_batch` tokens; the decoder body runs once per batch; the LM head is applied only
to the hidden states of answer positions, in chunks of positions, so that at most one chunk of
``positions x vocab`` logits is alive at a time and memory does not grow with sequence x vocab.

Monte-Carlo dropout (`mc_passes` K > 1): only the LoRA dropout modules (and, with
`model_dropout`, the model's own ``nn.Dropout`` modules) are put in train mode; everything else
stays in eval mode and every module's mode is restored afterwards. Each (batch, pass) draws its
dropout masks from a seed derived from one base seed, so results are reproducible given the torch
seed. When no dropout is active (p = 0 everywhere) the K passes would be identical, so the model
runs once and the pass is repeated.

Base-model scores (`score_base`) use peft's ``disable_adapter()``, so no second model is loaded;
`BaseScoreCache` keeps them on disk keyed by example id, model and task.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from starlora.errors import ConfigError
from starlora.models import cache_dir
from starlora.store import atomic_write
from starlora.tasks import Example, Task

MEASURES = ("pe", "me")
#: logits elements per chunk of answer positions (4M fp32 = 16 MiB; a few such buffers alive)
CHUNK_ELEMENTS = 1 << 22


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
    soft-capping, Cohere's scale); None for Llama, Qwen2, GPT-2 and most others."""
    config = _unwrap(model).config
    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    if not cap and not scale:
        return None

    def transform(z: torch.Tensor) -> torch.Tensor:
        if scale:
            z = z * scale
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


class _FastDropout(nn.Module):
    """Dropout whose mask costs one 64-bit random draw per 4 elements.

    On CPU, ``nn.Dropout`` draws one Mersenne-Twister number per element (~9 ns), which costs
    about as much as the forward pass of a LoRA model itself. Here each 16-bit lane of a random
    int64 decides one element: dropped with probability round(p * 2^16) / 2^16 (within 1e-5 of
    p), kept ones scaled by 1 / (1 - p) as usual. Uses torch's default generator, so
    ``torch.manual_seed`` still makes it reproducible.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.threshold = round(p * 65536) - 32768  # keep where lane >= threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device)
        lanes = words.random_(-(2**63), None).view(torch.int16)[: x.numel()].view(x.shape)
        return torch.where(lanes >= self.threshold, x * (1 / (1 - self.p)), 0.0)


def _sampled_dropouts(
    model: nn.Module, model_dropout: bool
) -> list[tuple[nn.Module, str, nn.Dropout]]:
    """(parent, attribute, module) of each dropout with p > 0 that MC dropout samples: those in
    peft's ``lora_dropout`` ModuleDicts and, with `model_dropout`, the model's own."""
    lora = {
        id(d)
        for m in model.modules()
        if isinstance(d := getattr(m, "lora_dropout", None), nn.ModuleDict)
    }
    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Dropout) and child.p > 0 and (model_dropout or id(parent) in lora)
    ]


@contextlib.contextmanager
def scoring_mode(
    model: nn.Module,
    mc_dropout: bool = False,
    model_dropout: bool = False,
    fast_dropout: bool = False,
) -> Iterator[bool]:
    """Eval mode for the whole model, except the dropout modules MC dropout samples (when
    `mc_dropout`), which are put in train mode, or with `fast_dropout` temporarily replaced
    by a `_FastDropout` of the same p. Restores the modules and every module's previous
    ``training`` flag on exit, also on an exception. Yields whether any dropout is active."""
    saved = [(m, m.training) for m in model.modules()]
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        model.eval()
        sampled = _sampled_dropouts(model, model_dropout) if mc_dropout else []
        for parent, name, d in sampled:
            if fast_dropout:
                setattr(parent, name, _FastDropout(d.p))
                swapped.append((parent, name, d))
            else:
                d.train()
        yield bool(sampled)
    finally:
        for parent, name, d in swapped:
            setattr(parent, name, d)
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


def _batch_end(
    lengths: np.ndarray,
    order: np.ndarray,
    start: int,
    limit: int,
    by_tokens: bool,
    max_padding: float,
) -> int:
    """End (exclusive, into `order`) of the batch that starts at `start`: at most `limit`
    padded tokens (`by_tokens`) or examples, and at most a `max_padding` fraction of padding.
    `order` sorts examples by decreasing length, so the first one sets the padded length."""
    longest = int(lengths[order[start]])
    n_max = max(1, limit // longest) if by_tokens else max(1, limit)
    end, useful = start + 1, longest
    while end < len(order) and end - start < n_max:
        useful += int(lengths[order[end]])
        if 1 - useful / ((end + 1 - start) * longest) > max_padding:
            break
        end += 1
    return end


def _score_batch(
    body: nn.Module,
    head: nn.Module,
    transform: Callable[[torch.Tensor], torch.Tensor] | None,
    seqs: list[tuple[list[int], list[int]]],
    pad_id: int,
    device: torch.device,
    want_pe: bool,
    want_me: bool,
    seeds: list[int] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-position NLL and entropy of one batch, for each pass.

    Returns (owner [P] int: index of the example in `seqs` of each answer position,
    nll [K, P] float64, entropy [K, P] float64), P = total answer tokens of the batch,
    K = len(seeds) or 1 (deterministic).
    """
    lengths = [len(p) + len(a) for p, a in seqs]
    B, T = len(seqs), max(lengths)
    ids = np.full((B, T), pad_id, np.int64)
    mask = np.zeros((B, T), np.int64)
    rows, cols, targets = [], [], []
    for j, (p, a) in enumerate(seqs):
        ids[j, : len(p)] = p
        ids[j, len(p) : len(p) + len(a)] = a
        mask[j, : lengths[j]] = 1
        # the logits at position t predict token t + 1
        rows.append(np.full(len(a), j))
        cols.append(np.arange(len(p) - 1, len(p) + len(a) - 1))
        targets.append(np.asarray(a, np.int64))
    owner = np.concatenate(rows)
    P = len(owner)
    input_ids = torch.from_numpy(ids).to(device)
    attention_mask = torch.from_numpy(mask).to(device)
    # right padding: real tokens sit at positions 0..len-1 in every architecture
    position_ids = torch.arange(T, device=device).expand(B, T)
    row_t = torch.from_numpy(owner).to(device)
    col_t = torch.from_numpy(np.concatenate(cols)).to(device)
    tgt_t = torch.from_numpy(np.concatenate(targets)).to(device)

    passes = seeds if seeds is not None else [None]
    nll = np.full((len(passes), P), np.nan)
    ent = np.full((len(passes), P), np.nan)
    for k, seed in enumerate(passes):
        if seed is not None:
            torch.manual_seed(seed)
        out = body(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
        hidden = out[0][row_t, col_t]  # [P, H], only answer positions
        del out
        chunk = max(1, CHUNK_ELEMENTS // head.weight.shape[0])
        nll_k = torch.empty(P, device=device)
        ent_k = torch.empty(P, device=device)
        for s in range(0, P, chunk):
            z = head(hidden[s : s + chunk]).float()  # [C, V]
            if transform is not None:
                z = transform(z)
            logp = torch.log_softmax(z, dim=-1)  # [C, V]; lse - E[z] would cancel badly
            del z
            if want_pe:
                nll_k[s : s + chunk] = -logp.gather(1, tgt_t[s : s + chunk, None])[:, 0]
            if want_me:
                # H = -sum_v p_v log p_v, the row-wise dot as a batched matmul
                dot = logp.exp().unsqueeze(1) @ logp.unsqueeze(2)
                ent_k[s : s + chunk] = -dot[:, 0, 0]
            del logp
        if want_pe:
            nll[k] = nll_k.double().cpu().numpy()
        if want_me:
            ent[k] = ent_k.double().cpu().numpy()
    return owner, nll, ent


# ------------------------------------------------------------------------------------------------
# public API
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
    max_tokens_per_batch: int = 16384,
    max_length: int | None = None,
    progress: bool = True,
    desc: str = "scoring",
    seed: int | None = None,
    max_padding: float | None = None,
) -> Scores:
    """PE and ME of every example's gold answer under `model` (plain or peft), teacher-forced.

    Args:
        measures: any of ``"pe"``, ``"me"``; the others come back as NaN and are not computed.
        mc_passes: K; with K > 1 the LoRA dropout (and the model's own dropout when
            `model_dropout`) samples a fresh mask per pass; scores are the mean over passes and
            ``pe_passes``/``me_passes`` hold the ``[N, K]`` per-pass values.
        batch_size: examples per batch, or ``"auto"``: as many as fit `max_tokens_per_batch`
            padded tokens. Either way the limit halves on out-of-memory.
        max_length: prompt + answer tokens; longer prompts are cut on the left. Default: the
            model's maximum position count.
        max_padding: largest fraction of padding tokens a batch may hold. Default 0.1 on CPU,
            where batching barely speeds up the matmuls and padding is pure waste, 0.5 on GPUs.
        seed: base seed of the dropout masks; default: drawn from torch's global generator
            (so ``torch.manual_seed`` makes scoring reproducible).
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
    limit = max_tokens_per_batch if by_tokens else int(batch_size)

    body, head = _body_and_head(model)
    transform = _logit_transform(model)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    max_length = max_length or _max_positions(model)
    if max_padding is None:
        max_padding = 0.1 if device.type == "cpu" else 0.5
    seqs = [_fit(*task.encode(tokenizer, ex), max_length) for ex in examples]
    lengths = np.array([len(p) + len(a) for p, a in seqs], np.int64)
    n_tok = np.array([len(a) for _, a in seqs], np.int64)
    order = np.argsort(-lengths, kind="stable")  # longest first: an OOM shows up at once

    N, K = len(examples), mc_passes
    pe = np.full((N, K), np.nan)
    me = np.full((N, K), np.nan)
    want_pe, want_me = "pe" in measures, "me" in measures

    from tqdm.auto import tqdm

    bar = tqdm(total=N, desc=desc, unit="ex", disable=not progress, dynamic_ncols=True)
    fork_devices = [device] if device.type == "cuda" else []
    with contextlib.ExitStack() as stack:
        stochastic = stack.enter_context(
            scoring_mode(model, K > 1, model_dropout, fast_dropout=device.type == "cpu")
        )
        if stochastic and seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        stack.enter_context(torch.random.fork_rng(devices=fork_devices, enabled=stochastic))
        stack.enter_context(torch.inference_mode())
        start = 0
        while start < N:
            end = _batch_end(lengths, order, start, limit, by_tokens, max_padding)
            idx = order[start:end]
            # one seed per (batch start, pass): reproducible given the base seed
            seeds = [seed + 1_000_003 * start + k for k in range(K)] if stochastic else None
            try:
                owner, nll, ent = _score_batch(
                    body,
                    head,
                    transform,
                    [seqs[i] for i in idx],
                    pad_id,
                    device,
                    want_pe,
                    want_me,
                    seeds,
                )
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
    reused and only the missing examples are computed."""
    kwargs = {**kwargs, "mc_passes": 1}
    kwargs.setdefault("desc", "scoring base")

    def compute(chunk: list[Example]) -> Scores:
        with _adapter_disabled(model):
            return score_examples(model, tokenizer, task, chunk, **kwargs)

    if cache is None:
        return compute(list(examples))
    return cache.get_or_compute(examples, compute)


# ------------------------------------------------------------------------------------------------
# base-score cache
def default_score_cache_dir() -> Path:
    """``<starlora cache>/scores``, shared by all runs of this user."""
    return cache_dir() / "scores"


def base_cache_key(
    model_name: str,
    task: Task,
    *,
    measures: Sequence[str] = MEASURES,
    dtype: Any = None,
    max_length: int | None = None,
) -> dict[str, Any]:
    """The key under which base scores are cached: everything that changes their values."""
    return {
        "version": 1,
        "model": model_name,
        "dtype": str(dtype) if dtype is not None else None,
        "task": task.name,
        "task_class": type(task).__name__,
        "prompt_style": task.prompt_style,
        "template": task.template,
        "answer_prefix": task.answer_prefix,
        "measures": sorted(measures),
        "max_length": max_length,
    }


class BaseScoreCache:
    """Base-model scores on disk, one JSON record per example id.

    Lives in `directory` as ``<sha of key>.jsonl`` (appended chunk by chunk while computing, so
    an interrupted computation resumes; a torn last line from a crash is dropped) next to
    ``<sha of key>.key.json`` holding the key for humans.
    """

    def __init__(self, directory: str | Path, key: dict[str, Any], chunk_size: int = 256):
        self.directory = Path(directory)
        self.key = dict(key)
        digest = hashlib.sha256(
            json.dumps(self.key, sort_keys=True, default=str).encode()
        ).hexdigest()[:20]
        self.path = self.directory / f"{digest}.jsonl"
        self.key_path = self.directory / f"{digest}.key.json"
        self.chunk_size = chunk_size
        self.computed = 0  # examples computed (not found) by the last get_or_compute

    def load(self) -> dict[str, dict[str, Any]]:
        """Records on disk by id; repairs the file if its last line is torn."""
        if not self.path.is_file():
            return {}
        raw = self.path.read_bytes()
        records: dict[str, dict[str, Any]] = {}
        good = 0
        for line in raw.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                break
            records[str(rec["id"])] = rec
            good += len(line)
        if good != len(raw):  # crash mid-write: keep the intact prefix
            atomic_write(self.path, raw[:good])
        return records

    def get_or_compute(
        self, examples: Sequence[Example], compute: Callable[[list[Example]], Scores]
    ) -> Scores:
        """Scores of `examples` (in order), computing only those not on disk yet."""
        have = self.load()
        missing = [ex for ex in examples if ex.id not in have]
        self.computed = len(missing)
        if missing:
            self.directory.mkdir(parents=True, exist_ok=True)
            if not self.key_path.is_file():
                atomic_write(self.key_path, json.dumps(self.key, indent=2, default=str).encode())
            for s in range(0, len(missing), self.chunk_size):
                records = compute(missing[s : s + self.chunk_size]).to_records()
                blob = "".join(json.dumps(r) + "\n" for r in records).encode()
                with open(self.path, "ab") as f:  # one write per chunk
                    f.write(blob)
                    f.flush()
                    os.fsync(f.fileno())
                have.update((r["id"], r) for r in records)
        return Scores.from_records([have[ex.id] for ex in examples])
