"""PE and ME at answer positions from final hidden states, in vocabulary tiles.

`answer_measures` is the fast kernel: it never holds ``positions x vocabulary`` logits at
once and merges per-tile statistics in float64. `starlora.scoring.reference` is the plain
definition it must agree with.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from starlora.errors import ConfigError

#: logits elements per tile of answer positions x vocabulary on CPU (4M fp32 = 16 MiB; two
#: alive) and on GPUs (64M = 256 MiB: a 128k vocabulary still gets 512 rows per head matmul)
CHUNK_ELEMENTS = 1 << 22
GPU_CHUNK_ELEMENTS = 1 << 26
#: LM-head columns per logits tile on CPU: measured fastest on SmolLM2's 49k vocabulary
#: (1024-4096 tried), 2.6x faster than whole-vocabulary rows
CPU_VOCAB_TILE = 2048


def _tiles(head: nn.Module, vocab_tile: int | None) -> tuple[list[tuple[int, int] | None], int]:
    """The vocabulary tiles `answer_measures` runs the head in ([None]: the whole vocabulary
    at once), and their width (columns)."""
    V = getattr(head, "out_features", None)
    weight = getattr(head, "weight", None)
    if V is None and isinstance(weight, torch.Tensor):
        V = weight.shape[0]
    if vocab_tile is None or type(head) is not nn.Linear or V is None or vocab_tile >= V:
        return [None], V or 1 << 16
    return [(v0, min(V, v0 + vocab_tile)) for v0 in range(0, V, vocab_tile)], vocab_tile


def head_rows(head: nn.Module, vocab_tile: int | None, max_elements: int = CHUNK_ELEMENTS) -> int:
    """Answer positions `answer_measures` sends through the head at once (the rows of one
    logits tile). The bits of a row can follow the number of rows it is computed with, so a
    caller that needs them fixed gives it a multiple of this many rows."""
    return max(1, max_elements // _tiles(head, vocab_tile)[1])


def answer_measures(
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
    tiles, width = _tiles(head, vocab_tile)
    rows = head_rows(head, vocab_tile, max_elements)
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
