"""The readable definition of PE and ME, and the check that the fast engine meets it.

`plain_batch` runs the model's own ``forward(...).logits`` on right-padded rows and takes the
log-softmax in float64 at the answer positions: for answer token a_i after its prefix,
PE = sum_i -log p(a_i) and ME = sum_i H(p(.)) over the full vocabulary (nats). The engine
falls back to it when its self-check finds the fast path off. `reference_scores` is the same
definition with nothing else: one unbatched forward per example, the specification that tests
hold the engine to.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from starlora.scoring.batching import batch_inputs, sequence_rows
from starlora.scoring.lora_fastpath import MaskSampler
from starlora.scoring.measures import CHUNK_ELEMENTS
from starlora.tasks import Example, Task


def plain_batch(
    model: nn.Module,
    seqs: list[tuple[list[int], list[int]]],
    pad_id: int,
    device: torch.device,
    seeds: list[int] | None,
    sampler: MaskSampler | None = None,
    mask_seeds: list[list[int]] | None = None,
    width: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The definition of PE and ME, and the path scoring falls back to: right-padded rows
    through the model's own ``forward(...).logits`` (LoRA layers as peft runs them), log-softmax
    in float64 at the answer positions (`CHUNK_ELEMENTS` at a time). Pass k seeds torch's
    dropout with ``seeds[k]``, and `sampler` (which peft's LoRA dropouts draw from on CPU, see
    `scoring_mode`) as `_score_batch` does: with ``mask_seeds[k]``, one stream per sequence.
    Rows are at least `width` tokens wide. Returns what `_score_batch` returns: owner [P],
    nll [K, P], entropy [K, P] (nats)."""
    arrays, flat, targets, owner = batch_inputs(seqs, pad_id, packed=False, width=width)
    lengths = [len(p) + len(a) for p, a in seqs]
    inputs = {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}  # ids, positions, mask
    flat_t, tgt_t = (torch.from_numpy(a).to(device) for a in (flat, targets[:, None]))
    passes = seeds if seeds is not None else [None]
    nll, ent = np.empty((len(passes), len(owner))), np.empty((len(passes), len(owner)))
    for k, seed in enumerate(passes):
        if seed is not None:
            torch.manual_seed(seed)
            if sampler is not None:
                sampler.seed_pass(seed, None if mask_seeds is None else mask_seeds[k],
                                  sequence_rows(lengths, False, width), lengths)
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


def reference_scores(model: nn.Module, tokenizer: Any, task: Task,
                     examples: Sequence[Example]) -> tuple[np.ndarray, np.ndarray]:
    """PE and ME ([N] float64, nats) of each example's gold answer, by the definition and
    nothing else: one unbatched forward per example, log-softmax of all its logits in float64.
    Slow; the specification that tests and the scoring benchmark hold the engine to (pass a
    float64 copy of the model for a float64 reference)."""
    pe, me = [], []
    with torch.no_grad():
        for ex in examples:
            p, a = task.encode(tokenizer, ex)
            logits = model(input_ids=torch.tensor([p + a])).logits[0].double()
            logp = torch.log_softmax(logits, -1)[len(p) - 1 : len(p) + len(a) - 1]
            pe.append(-logp[torch.arange(len(a)), torch.tensor(a)].sum().item())
            me.append(-(logp.exp() * logp).sum().item())
    return np.array(pe), np.array(me)
