"""How much of a model each process holds under DeepSpeed ZeRO-3 (`starlora.zero3`).

    python benchmarks/zero3_memory.py                      # one process: the whole model
    accelerate launch --config_file configs/accelerate/deepspeed-zero3.yaml \\
        --num_processes 2 --mixed_precision no benchmarks/zero3_memory.py    # CPU, gloo

Loads the model as `starlora run` does and prints, per process, the parameter elements it
holds, their share of the whole, and the process's resident memory (RSS); the main process
ends with ``held_fraction=<largest share>``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from starlora import distributed as dist  # noqa: E402
from starlora import zero3  # noqa: E402
from starlora.models import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()
    import psutil

    loaded = load_model(args.model, device="cpu", dtype="float32")
    with zero3.forward_hooks(loaded.model):  # a tiny model is partitioned by its first engine
        pass
    held, whole = zero3.held_elements(loaded.model)
    rss = psutil.Process().memory_info().rss / 2**20
    rows = dist.map_shards(lambda _: [(dist.rank(), held, rss)], [0] * dist.world_size(),
                           [1] * dist.world_size())
    if dist.is_main():
        for rank, n, mib in sorted(set(rows)):
            print(f"process {rank}: holds {n:,} of {whole:,} parameter elements "
                  f"({n / whole:.3f}), RSS {mib:.0f} MiB")
        print(f"processes={dist.world_size()} zero3={zero3.enabled()} "
              f"held_fraction={max(n for _, n, _ in rows) / whole:.3f}")


if __name__ == "__main__":
    main()
