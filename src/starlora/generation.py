"""Batched generation of answers: for evaluation and for label-free uncertainty.

`generate` takes prompt token ids and returns, per prompt and sample, the generated token ids
(up to and including the first stop token) and the log-probability of each. Prompts are sorted
by length and cut into batches (little padding), left-padded so that every row ends where
generation starts, and decoded with the model's KV cache (transformers' ``generate``); each row
stops at its own EOS (or any end-of-turn token the model's generation config names).

Greedy decoding is deterministic. Sampling (``temperature > 0``) generates each prompt's
samples as one batch, with torch's generator seeded by that prompt's seed, so a prompt's
samples do not depend on the other prompts or the batch size; the log-probabilities are then
those of the tempered distribution the tokens were drawn from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from starlora import zero3
from starlora.attention import attention_kernels


@dataclass
class Generated:
    """N prompts x S samples, row ``i * S + s`` = sample s of prompt i.

    `tokens` [N*S] lists of generated ids (the stop token included when one was generated);
    `logprobs` [N*S] float64 arrays of the same lengths (nats); `texts` [N*S] the decoded
    tokens without special tokens. With ``generate(measure=True)``: `nll` and `entropy` [N*S]
    float64 arrays of the same lengths (nats), per generated token the -log p of the token and
    the entropy of the model's own next-token distribution (its raw logits: no temperature
    or other processing), the teacher-forced PE and ME terms of the first scoring pass.
    """

    tokens: list[list[int]]
    logprobs: list[np.ndarray]
    texts: list[str]
    samples: int = 1
    nll: list[np.ndarray] | None = None
    entropy: list[np.ndarray] | None = None

    def of(self, i: int) -> range:
        """Row indices of prompt i's samples."""
        return range(i * self.samples, (i + 1) * self.samples)

    def best_text(self, i: int) -> str:
        """Prompt i's most likely answer among its samples (the highest summed log-probability),
        stripped: the draft shown to people."""
        return self.texts[max(self.of(i), key=lambda j: float(self.logprobs[j].sum()))].strip()


def stop_tokens(model: Any, tokenizer: Any) -> list[int]:
    """The tokenizer's EOS and any end-of-turn token the model's generation config names."""
    model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stop = {tokenizer.eos_token_id, *(model_eos if isinstance(model_eos, list) else [model_eos])}
    stop.discard(None)
    return sorted(stop)


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
) -> Generated:
    """Generate `samples` answers for each prompt (token ids) with `model` in eval mode.

    ``temperature == 0``: greedy, in batches of `batch_size` rows (several greedy samples
    would be copies: asking for them is an error). ``temperature > 0``: one batch of `samples`
    rows per prompt, seeded by ``seeds[i]`` (default: i). `measure`: also the per-token NLL
    and entropy of the model's raw logits at each generated position (`Generated.nll`,
    `Generated.entropy`; `token_measures`), computed from the logits the decoding step made.
    """
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    if samples < 1 or (samples > 1 and temperature <= 0):
        raise ValueError("several samples need a temperature > 0")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stop = stop_tokens(model, tokenizer)
    sampling = temperature > 0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=sampling, num_beams=1,
        temperature=temperature if sampling else None, top_k=0 if sampling else None,
        top_p=1.0 if sampling else None, pad_token_id=pad, eos_token_id=stop or None,
        bos_token_id=tokenizer.bos_token_id, output_scores=True, return_dict_in_generate=True,
        output_logits=measure,
    )
    rows = [i for i in range(len(prompts)) for _ in range(samples)]
    order = sorted(range(len(rows)), key=lambda j: (-len(prompts[rows[j]]), j))
    if sampling:
        batch_size = samples
        seeds = list(seeds) if seeds is not None else list(range(len(prompts)))
    tokens: list[list[int]] = [[] for _ in rows]
    logprobs: list[np.ndarray] = [np.zeros(0) for _ in rows]
    nll: list[np.ndarray] = [np.zeros(0) for _ in rows]
    entropy: list[np.ndarray] = [np.zeros(0) for _ in rows]
    was_training = model.training
    model.eval()
    try:
        # forward_hooks: a no-op unless the weights are partitioned (`starlora.zero3`)
        with zero3.inference_mode(), zero3.forward_hooks(model), attention_kernels(device):
            batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
            for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress,
                              dynamic_ncols=True):
                longest = max(len(prompts[rows[j]]) for j in batch)
                ids = torch.full((len(batch), longest), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), longest), dtype=torch.long)
                for r, j in enumerate(batch):
                    p = prompts[rows[j]]
                    ids[r, longest - len(p) :] = torch.tensor(p, dtype=torch.long)
                    mask[r, longest - len(p) :] = 1
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [],
                                           enabled=sampling):
                    if sampling:
                        torch.manual_seed(seeds[rows[batch[0]]])
                    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                         generation_config=config,
                                         synced_gpus=zero3.enabled())  # equal forward counts
                new = out.sequences[:, longest:].tolist()
                # log-softmax of the (tempered) scores the tokens were chosen from
                logp = model.compute_transition_scores(out.sequences, out.scores,
                                                       normalize_logits=True)
                logp = logp.double().cpu().numpy()
                ends = [next((t + 1 for t, tok in enumerate(new[r]) if tok in stop), len(new[r]))
                        for r in range(len(batch))]
                if measure:
                    b_nll, b_ent = token_measures(out.logits, out.sequences[:, longest:], ends)
                for r, j in enumerate(batch):
                    n = ends[r]  # up to and including the first stop token
                    tokens[j], logprobs[j] = new[r][:n], logp[r, :n]
                    if measure:
                        nll[j], entropy[j] = b_nll[r, :n], b_ent[r, :n]
                del out
    finally:
        model.train(was_training)
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    return Generated(tokens, logprobs, texts, samples, nll if measure else None,
                     entropy if measure else None)


def token_measures(
    logits: Sequence[torch.Tensor], chosen: torch.Tensor, ends: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-token NLL and entropy of a generated batch from its raw logits.

    logits: T steps of [B, V] float32 logits (``generate(output_logits=True)``: the model's
    own, before any processor or temperature); chosen [B, T] the generated ids; ends [B] the
    number of tokens each row keeps (up to its first stop token). Returns (nll [B, T],
    entropy [B, T]) float64 nats; positions at or after a row's end (padding after EOS, whose
    logits saw the stop token) are NaN. Each step's log-softmax is computed in float32
    (max-shifted, as the scorer's tiles are, `starlora.scoring.measures`), the entropy summed
    over the vocabulary by torch's cascade sum.
    """
    B, T = chosen.shape[0], len(logits)
    nll = np.full((B, T), np.nan)
    ent = np.full((B, T), np.nan)
    live = torch.tensor([int(e) for e in ends])
    for t, z in enumerate(logits):
        rows = (live > t).nonzero()[:, 0]  # rows still generating at step t
        if rows.numel() == 0:
            break
        z = z[rows.to(z.device)].float()
        logp = z - torch.logsumexp(z, dim=-1, keepdim=True)  # [R, V]
        picked = logp.gather(1, chosen[rows, t].to(z.device)[:, None])[:, 0]
        p = logp.exp()
        h = -torch.where(p > 0, p * logp, 0.0).sum(dim=-1)  # a cascade sum: ~1e-7 relative
        idx = rows.numpy()
        nll[idx, t] = -picked.double().cpu().numpy()
        ent[idx, t] = h.cpu().numpy()
    return nll, ent
