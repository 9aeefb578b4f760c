"""The peft-specific part of scoring, fenced in one module: a fused forward for peft LoRA
``Linear`` layers, Monte-Carlo dropout masks on LoRA A's input, and the context that puts a
model in scoring mode (`scoring_mode`) and restores it afterwards.

Everything here reads peft's public layer attributes (``lora_A``, ``lora_B``, ``scaling``,
``lora_dropout``, ``active_adapters``, ``merged``, ``disable_adapters``, ``lora_variant``) and
patches a layer's ``forward`` on the instance only, for the duration of `scoring_mode`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn


def _dropped_lanes(p: float) -> int:
    """How many of the 65536 values of a 16-bit lane drop an element at rate p."""
    return min(round(p * 65536), 65535)


class MaskSampler:
    """Dropout on the input of LoRA A for the MC passes of `LoraScoringForward`.

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

    Seeding, on CPU: `begin_pass` gives every sequence of the batch its own stream (seeded from
    the example's id and the pass, `starlora.scoring.options.example_seeds`) and the rows of
    the flattened input it occupies. Each layer call draws a sequence's mask from its own
    stream, in layer order, so an example's masks do not depend on which examples share its
    batch, on the batch's layout (packed or padded) or on how a pool is split between
    processes. Rows outside every sequence (padding) are not masked and project to 0.
    `reseed` (one stream for all rows) serves callers that pass no layout, and other devices.
    """

    block_elements = 1 << 17  # elements of x masked at a time (~0.75 MiB of lanes + mask)

    def __init__(self, device: torch.device):
        self.cpu = device.type == "cpu"
        self._gen = np.random.SFC64(0)
        self._segments: list[tuple[np.random.SFC64, int, int]] | None = None

    def reseed(self, seed: int) -> None:
        """One stream for all rows of every following call."""
        self._gen = np.random.SFC64(seed)
        self._segments = None

    def begin_pass(self, seeds: list[int], starts: list[int], lengths: list[int]) -> None:
        """Sequence j of the next forward occupies rows ``starts[j] .. starts[j] +
        lengths[j] - 1`` of every LoRA layer's flattened input and draws its masks from a
        stream seeded by ``seeds[j]``."""
        self._segments = [(np.random.SFC64(s), int(a), int(n))
                          for s, a, n in zip(seeds, starts, lengths)]

    def seed_pass(
        self, seed: int, seeds: list[int] | None, starts: list[int], lengths: list[int]
    ) -> None:
        """Before a pass over a batch laid out as `starts` and `lengths` (rows): per-sequence
        streams (`begin_pass`) when `seeds` is given, else one stream seeded by `seed`."""
        if seeds is None:
            self.reseed(seed)
        else:
            self.begin_pass(seeds, starts, lengths)

    def _keeps(self, x: torch.Tensor, p: float) -> Iterator[tuple[int, int, torch.Tensor]]:
        """CPU masks of x [rows, d_in], a block of rows at a time: yields (first row, end row,
        keep [end - first, d_in] 0/1 in x's dtype), each sequence's blocks from its stream in
        row order. Rows outside every sequence get no block."""
        cut = _dropped_lanes(p) - 32768  # keep where the signed lane >= cut
        rows = x.shape[0]
        segments = self._segments if self._segments is not None else [(self._gen, 0, rows)]
        step = max(1, self.block_elements // x.shape[1])
        buffer = x.new_empty(min(step, rows), x.shape[1])
        for gen, first, count in segments:
            for s in range(first, first + count, step):
                e = min(s + step, first + count)
                n = (e - s) * x.shape[1]
                lanes = torch.from_numpy(gen.random_raw((n + 3) // 4).view(np.int16)[:n])
                yield s, e, torch.ge(lanes.view(e - s, x.shape[1]), cut, out=buffer[: e - s])

    def _covers(self, rows: int) -> bool:
        return self._segments is None or sum(n for _, _, n in self._segments) == rows

    def _fits(self, rows: int) -> bool:
        """Whether the layout fits an input of `rows` rows (not so for a layer that sees
        another set of rows than the batch's tokens, e.g. routed experts: torch's dropout)."""
        return self._segments is None or all(a + n <= rows for _, a, n in self._segments)

    def project(
        self, x: torch.Tensor, weight: torch.Tensor, p: float
    ) -> tuple[torch.Tensor, float]:
        """x [rows, d_in], weight [r, d_in] -> (h [rows, r], gain)."""
        if not self.cpu or not self._fits(x.shape[0]):
            return nn.functional.linear(nn.functional.dropout(x, p, training=True), weight), 1.0
        dropped = _dropped_lanes(p)
        if dropped == 0:
            return nn.functional.linear(x, weight), 1.0
        rows = x.shape[0]
        h = x.new_empty(rows, weight.shape[0]) if self._covers(rows) else \
            x.new_zeros(rows, weight.shape[0])
        for s, e, keep in self._keeps(x, p):
            torch.mm(keep.mul_(x[s:e]), weight.t(), out=h[s:e])
        return h, 65536 / (65536 - dropped)

    def dropout(self, x: torch.Tensor, p: float) -> torch.Tensor:
        """x [..., d_in] -> x with the masks `project` would draw applied and scaled by the
        gain: ``dropout(x) @ A.T`` is ``project(x, A, p)`` (up to float rounding), for peft's
        own LoRA forward (`SampledDropout`). Rows outside every sequence are zeroed."""
        x2 = x.reshape(-1, x.shape[-1])
        if not self.cpu or not self._fits(x2.shape[0]):
            return nn.functional.dropout(x, p, training=True)
        dropped = _dropped_lanes(p)
        if dropped == 0:
            return x
        out = torch.empty_like(x2) if self._covers(x2.shape[0]) else torch.zeros_like(x2)
        for s, e, keep in self._keeps(x2, p):
            torch.mul(keep, x2[s:e], out=out[s:e])
        return out.mul_(65536 / (65536 - dropped)).view(x.shape)


class SampledDropout:
    """The ``forward`` of one of peft's ``lora_dropout`` modules during MC scoring on CPU
    (installed by `scoring_mode`): `MaskSampler.dropout`, so that layers peft runs itself (the
    plain forward path, LoRA variants) draw each example's masks from the example's stream,
    as the fused layers do."""

    def __init__(self, sampler: MaskSampler, p: float):
        self.sampler, self.p = sampler, p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.sampler.dropout(x, self.p)


class LoraScoringForward:
    """The ``forward`` of one peft LoRA ``Linear`` while it scores (installed by `scoring_mode`).

    Computes what peft computes, ``base(x) + scaling * B(A(dropout(x)))``, with less traffic:

    * the scaled LoRA update is accumulated into the base output by one in-place ``addmm_``
      (peft: a matmul, then a scaled copy, then an added copy);
    * MC passes (`sampler` given) mask A's input with `MaskSampler` and fold 1 / (1 - p) into
      the addmm's alpha;
    * deterministic passes with fp32/fp64 weights and more than ``d_in*d_out/(d_in+d_out)``
      rows merge the adapter into a temporary weight (``W + scaling * B @ A``, one matmul),
      which costs fewer FLOPs than the two LoRA matmuls over the rows.

    Anything else (an adapter disabled or merged, a LoRA variant such as DoRA, a LoRA bias,
    mixed dtypes, per-call adapter names) goes through peft's own forward.
    """

    def __init__(self, layer: nn.Module, sampler: MaskSampler | None):
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


def lora_linears(model: nn.Module) -> list[nn.Module]:
    """peft LoRA ``Linear`` layers that `LoraScoringForward` may run: not those whose forward
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


def sampled_dropouts(model: nn.Module, model_dropout: bool) -> list[nn.Dropout]:
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
    sampler: MaskSampler | None = None,
    fused: bool = True,
) -> Iterator[bool]:
    """Eval mode for the whole model, except the dropout modules MC dropout samples (when
    `mc_dropout`), which are put in train mode. With `fused`, every peft LoRA ``Linear`` runs a
    `LoraScoringForward` meanwhile (its masks come from `sampler` when `mc_dropout`). On CPU,
    peft's LoRA dropout modules draw from `sampler` too (`SampledDropout`), for the layers peft
    runs itself. Restores every module's forward and previous ``training`` flag on exit, also
    on an exception. Yields whether any dropout is active."""
    saved = [(m, m.training) for m in model.modules()]
    patched: list[nn.Module] = []
    try:
        model.eval()
        sampled = sampled_dropouts(model, model_dropout) if mc_dropout else []
        for d in sampled:
            d.train()
        if sampled:
            # peft's LoRA variants (DoRA) apply the dropout only while the layer itself trains
            for layer in model.modules():
                if getattr(layer, "lora_variant", None):
                    layer.training = True  # this flag only, not its base layer's
        if mc_dropout and sampler is None:
            sampler = MaskSampler(next(model.parameters()).device)
        if sampled and sampler is not None and sampler.cpu:  # peft's LoRA dropouts
            for d in sampled_dropouts(model, model_dropout=False):
                d.forward = SampledDropout(sampler, d.p)
                patched.append(d)
        for layer in lora_linears(model) if fused else []:
            layer.forward = LoraScoringForward(layer, sampler if sampled else None)
            patched.append(layer)
        yield bool(sampled)
    finally:
        for module in patched:
            del module.forward  # the class's forward shows through again
        for m, flag in saved:
            m.training = flag


def adapter_disabled(model: nn.Module) -> contextlib.AbstractContextManager:
    """peft's ``disable_adapter()`` for a PeftModel; nothing to do for a plain model."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return contextlib.nullcontext()
    return model.disable_adapter() if isinstance(model, PeftModel) else contextlib.nullcontext()
