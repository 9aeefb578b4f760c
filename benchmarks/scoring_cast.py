"""What a bf16 scoring call pays to get its bf16 weights: a deep copy of the model cast with
``.to(bfloat16)`` (what the scorer did before `weights_cast`) against
`starlora.scoring.engine.weights_cast` (the caller's weights cast in place and restored).

    python benchmarks/scoring_cast.py [--model smollm2-135m-instruct] [--repeats 3]

Both run side by side in one process on the same fp32 model with a LoRA adapter; prints the
median seconds of each and ends with ``copy_vs_cast=<ratio>``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from starlora.adapters import attach_lora  # noqa: E402
from starlora.models import load_model  # noqa: E402
from starlora.scoring.engine import weights_cast  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = attach_lora(load_model(args.model, device="cpu", dtype="float32").model, r=8)
    copies, casts = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        cast = copy.deepcopy(model).to(torch.bfloat16)
        copies.append(time.perf_counter() - start)
        del cast
        start = time.perf_counter()
        with weights_cast(model, torch.bfloat16):
            casts.append(time.perf_counter() - start)  # in and out: the restore costs ~0
    copy_s, cast_s = statistics.median(copies), statistics.median(casts)
    print(f"model={args.model} threads={torch.get_num_threads()} copy_s={copy_s:.3f} "
          f"cast_s={cast_s:.3f}")
    print(f"copy_vs_cast={copy_s / cast_s:.1f}")


if __name__ == "__main__":
    main()
