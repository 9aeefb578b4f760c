"""Save a random-init model of SmolLM2's family, with SmolLM2's tokenizer, for speed figures.

Teacher-forced training and scoring take the same time whatever the weights are, so a machine
that cannot reach the Hub (or cannot carry a large checkpoint) can still time larger models:

    python benchmarks/random_model.py --shape 1.7b --out /tmp/rand-1.7b --device cuda
    python benchmarks/training.py --model /tmp/rand-1.7b --device cuda --limit 128

Shapes: ``135m`` is SmolLM2-135M's config as packaged; ``1.7b`` changes its widths and depth
to SmolLM2-1.7B's (hidden 2048, MLP 8192, 24 layers, 32 heads, no grouped KV: 1.71B
parameters). The weights are saved in bf16 (``--dtype``), seeded (``--seed``), as
safetensors; the tokenizer files are copied from the packaged model, or from ``--source`` (a
folder with SmolLM2's config.json and tokenizer files, for a machine without the package).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from starlora.models import SMOLLM2, resolve_model  # noqa: E402

SHAPES = {
    "135m": {},
    "1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                 num_attention_heads=32, num_key_value_heads=32, head_dim=64),
}


def main() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1.7b")
    ap.add_argument("--out", required=True, help="folder to write (config, weights, tokenizer)")
    ap.add_argument("--device", default="cpu", help="where to initialise (cuda is much faster)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--source", help="folder with config.json and tokenizer files "
                                     "(default: the packaged SmolLM2-135M-Instruct)")
    args = ap.parse_args()

    start = time.perf_counter()
    source = Path(args.source or resolve_model(SMOLLM2))
    config = AutoConfig.from_pretrained(source, **SHAPES[args.shape])
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    out = Path(args.out)
    model.save_pretrained(out)
    for f in source.iterdir():
        if f.name != "config.json" and f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.shape}: {n / 1e6:.0f}M parameters ({args.dtype}) in {out}, "
          f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
