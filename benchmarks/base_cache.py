"""What the base-score cache pays for records that do not follow their batch-mates: cached
base scores (`starlora.scoring.score_base` with a cache) are computed in fixed shapes; every
other scoring call packs length-sorted sequences back to back.

    python benchmarks/base_cache.py [--model smollm2-135m-instruct] [--n 200] [--dtype bfloat16]

Side by side in one process, on `arith` pool items with their gold answers (the authors'
protocol, where the base term is cached): the whole set scored packed and in fixed shapes
(seconds each), then the same set scored again in two halves. Prints the largest PE change
the halves make (other batch-mates) for each kind of batch, and ends with
``fixed_vs_packed=<seconds ratio> packed_mates=<max |dPE|> fixed_mates=<max |dPE|>``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from starlora.models import load_model  # noqa: E402
from starlora.scoring import score_examples  # noqa: E402
from starlora.scoring.engine import CPU_TOKENS_PER_BATCH  # noqa: E402
from starlora.tasks import get_task  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    loaded = load_model(args.model, device="cpu", dtype="float32")
    task = get_task("arith")
    pool = task.generate("train", args.n, 1)
    half = args.n // 2
    dtype = getattr(torch, args.dtype)
    kinds = {"packed": {}, "fixed": {"fixed_shape": ("tokens", CPU_TOKENS_PER_BATCH)}}
    seconds, mates = {}, {}
    for name, extra in kinds.items():
        def run(part: list, extra: dict = extra) -> np.ndarray:
            return score_examples(loaded.model, loaded.tokenizer, task, part, dtype=dtype,
                                  progress=False, **extra).pe

        start = time.perf_counter()
        whole = run(pool)
        seconds[name] = time.perf_counter() - start
        halves = np.concatenate([run(pool[:half]), run(pool[half:])])
        mates[name] = float(np.abs(whole - halves).max())
        print(f"{name}: {args.n} items in {seconds[name]:.2f} s, "
              f"max |PE whole - PE halves| = {mates[name]:.2e} nats")
    print(f"model={args.model} dtype={args.dtype} threads={torch.get_num_threads()}")
    print(f"fixed_vs_packed={seconds['fixed'] / seconds['packed']:.2f} "
          f"packed_mates={mates['packed']:.2e} fixed_mates={mates['fixed']:.2e}")


if __name__ == "__main__":
    main()
