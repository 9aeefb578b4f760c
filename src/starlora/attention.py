"""Which attention kernels starlora's forward and backward passes may use.

`attention_kernels(device)` is the one place that decides. On CUDA it allows torch's flash,
memory-efficient and math kernels for ``scaled_dot_product_attention`` and leaves out cuDNN
attention; elsewhere (CPU) it changes nothing, so CPU results are the same with or without it.

Why: torch picks cuDNN attention first on Hopper (H100, H200) for bf16 and fp16 inputs, and
cuDNN builds an execution plan for each new input shape. starlora's shapes change all the
time: length-grouped training batches have their own widths, and generation's key length grows
by one with every token. Measured on an H100 (torch 2.11, cuDNN 9.19; docs/benchmarks.md,
"cuDNN attention on GPUs"): without cuDNN attention, generation ran 5.6x as fast and training at
the 1.7B shape 1.4-1.6x as fast, scoring was unchanged, and nothing was slower. fp32 inputs never
reach cuDNN attention, so fp32 work is unaffected either way.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

#: the kernels allowed on CUDA, in torch's own order of preference
CUDA_KERNELS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def attention_kernels(device: torch.device | str) -> contextlib.AbstractContextManager:
    """A context in which SDPA on `device` uses `CUDA_KERNELS` (CUDA) or its defaults (other)."""
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel(list(CUDA_KERNELS))  # it takes a list or one backend
