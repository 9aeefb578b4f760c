"""Batches of (prompt, answer) token sequences: cutting to a maximum length, grouping by
length under a token budget, and the model inputs of one batch (packed or padded)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from starlora.models import token_limit
from starlora.tasks import Example, Task


def fit(
    prompt: list[int], answer: list[int], max_length: int | None
) -> tuple[list[int], list[int]]:
    """Cut a too-long pair to `max_length` tokens: the prompt loses tokens on the left (at
    least one is kept), then, if still too long, the answer loses tokens on the right."""
    if max_length is None or len(prompt) + len(answer) <= max_length:
        return prompt, answer
    keep = max(1, max_length - len(answer))
    prompt = prompt[-keep:]
    return prompt, answer[: max_length - len(prompt)]


def encode_pairs(
    model: nn.Module, tokenizer: Any, task: Task, examples: Sequence[Example],
    max_length: int | None, answer_ids: Sequence[Sequence[int]] | None = None,
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) each example is scored on: its gold answer as `Task.encode`
    makes it, or the given `answer_ids` (generated tokens, scored exactly as generated),
    cut to `max_length` capped at the model's maximum positions (`token_limit`)."""
    max_length = token_limit(model, max_length)
    if answer_ids is None:
        return [fit(*task.encode(tokenizer, ex), max_length) for ex in examples]
    if len(answer_ids) != len(examples):
        raise ValueError(f"{len(answer_ids)} answers for {len(examples)} examples")
    return [fit(task.prompt_ids(tokenizer, ex), [int(t) for t in a], max_length)
            for ex, a in zip(examples, answer_ids)]


def batch_end(
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


#: the token granule of every fixed shape: a scored or embedded sequence is right-padded to
#: the next multiple of BUCKET tokens, a generated prompt left-padded to the multiple above it
BUCKET = 16


class BatchTooLarge(torch.OutOfMemoryError):
    """Out of memory in a fixed-shape batch of more than one row: a smaller batch shape may
    fit (the caller's cache key names the shape, so it is the caller who halves it)."""


def fixed_batch(widths: np.ndarray, order: np.ndarray, start: int, shape: tuple[str, int],
                filler: tuple[list[int], list[int]]) -> tuple[np.ndarray, list, int]:
    """The fixed-shape batch that starts at `start` of `order` (sorted by decreasing `widths`,
    multiples of `BUCKET`): its examples (indices, all of the first one's width W), and the
    number of rows it must have: `shape` ``("rows", B)`` or ``("tokens", T)``, T // W rows.
    The caller fills the rows up with `filler` (a sequence without answer tokens, so it adds
    no answer positions) and pads every row to W, so the batch's shape depends on W alone:
    a sequence's bits do not depend on its batch-mates. Returns (indices, the fillers, W)."""
    width = int(widths[order[start]])
    rows = max(1, shape[1] // width) if shape[0] == "tokens" else int(shape[1])
    idx = order[start:start + rows]
    idx = idx[widths[idx] == width]
    return idx, [filler] * (rows - len(idx)), width


def sequence_rows(lengths: Sequence[int], packed: bool, width: int = 0) -> list[int]:
    """The first row of each sequence in a batch's flattened input ``[rows * T]`` (the layout
    `batch_inputs` builds): back to back when `packed`, one right-padded row of
    ``max(width, *lengths)`` each otherwise."""
    if packed:
        return [int(s) for s in np.concatenate([[0], np.cumsum(lengths)[:-1]])]
    return [j * max(width, int(max(lengths))) for j in range(len(lengths))]


def batch_inputs(
    seqs: list[tuple[list[int], list[int]]], pad_id: int, packed: bool, width: int = 0
) -> tuple[dict[str, np.ndarray | None], np.ndarray, np.ndarray, np.ndarray]:
    """Model inputs of one batch and where its answers are.

    Packed: one row ``[1, sum(L)]`` holding the sequences back to back, positions restarting at
    0 for each, no attention mask. Padded: ``[B, max(width, *L)]`` right-padded with a mask;
    real tokens sit at positions 0..len-1 in every architecture either way.

    Returns (inputs: input_ids, position_ids, attention_mask (None when packed);
    flat [P]: index of each answer position's hidden state in the flattened ``[rows * T]``
    output; targets [P]: the answer token it predicts; owner [P]: its sequence's index in seqs).
    """
    lengths = np.array([len(p) + len(a) for p, a in seqs], np.int64)
    starts = sequence_rows(lengths, packed, width)
    width = int(lengths.sum()) if packed else max(width, int(lengths.max()))
    rows = 1 if packed else len(seqs)
    ids = np.full((rows, width), pad_id, np.int64)
    positions = np.zeros((rows, width), np.int64) if packed else np.tile(np.arange(width), (rows, 1))
    flat, targets, owner = [], [], []
    for j, (p, a) in enumerate(seqs):
        row, offset = (0, starts[j]) if packed else (j, 0)
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
