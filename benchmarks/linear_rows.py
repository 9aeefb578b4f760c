"""Why greedy decoding on a CPU is bound by reading the weights, not by matmul flops.

    OMP_NUM_THREADS=1 python benchmarks/linear_rows.py [--dtype bfloat16]

Times one linear layer of SmolLM2-135M's MLP shape (576 -> 1536, the weights in `--dtype`) on
M input rows, M = 1 .. 1024 (median of `--calls` calls after a warm-up): a decoding step runs
each layer on M = the batch's rows, a prefill or a scoring pass on M = thousands of tokens.
Each call takes the next of 64 weight matrices of that shape (108-216 MiB, more than the
caches hold), as a decoding step reads every layer's weights once: a call's weights come from
memory, not from a cache. Also times a copy of a 256 MiB buffer (the memory bandwidth one thread gets). Prints, per M,
the time a call takes, its flop rate and the time reading the weight matrix once at that
bandwidth would take. Last line: ``us_per_call_m1=... us_per_call_m16=... weight_read_us=...``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SHAPE = (1536, 576)  # SmolLM2-135M: intermediate_size x hidden_size


def timed(fn, calls: int) -> float:
    for _ in range(max(3, calls // 10)):
        fn()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    src = torch.empty(256 * 2**20, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src), 10)
    bandwidth = 2 * src.numel() / copy_s  # bytes read + written per second
    weights = [torch.randn(*SHAPE, dtype=dtype) for _ in range(64)]
    weight_bytes = weights[0].numel() * weights[0].element_size()
    weight_read = weight_bytes / bandwidth
    print(f"threads={torch.get_num_threads()} dtype={args.dtype} weight={SHAPE[0]}x{SHAPE[1]} "
          f"({weight_bytes / 2**20:.2f} MiB) copy_bandwidth={bandwidth / 1e9:.1f} GB/s "
          f"(read+write) weight_read_us={weight_read * 1e6:.0f}")
    per = {}
    for m in (1, 16, 64, 256, 1024):
        x = torch.randn(m, SHAPE[1], dtype=dtype)
        turn = iter(range(10**9))
        s = timed(lambda x=x, turn=turn: torch.nn.functional.linear(x, weights[next(turn) % 64]),
                  args.calls if m < 1024 else 64)
        per[m] = s
        print(f"M={m:5d}: {s * 1e6:8.1f} us/call {2 * m * SHAPE[0] * SHAPE[1] / s / 1e9:7.1f} "
              f"GFLOP/s  ({s / weight_read:.1f}x one read of the weights)")
    print(f"us_per_call_m1={per[1] * 1e6:.1f} us_per_call_m16={per[16] * 1e6:.1f} "
          f"us_per_call_m1024={per[1024] * 1e6:.1f} weight_read_us={weight_read * 1e6:.1f}")


if __name__ == "__main__":
    main()
