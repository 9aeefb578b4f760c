"""Prompt embeddings and k-means at pool scale: what `typiclust` and ``diversity: kmeans`` cost.

    python benchmarks/embedding.py                     # 10,000 arith prompts, SmolLM2, CPU
    python benchmarks/embedding.py --task gsm8k        # the 7,473 GSM8K train prompts

1. Embeds `--prompts` pool prompts with the frozen SmolLM2-135M-Instruct
   (`starlora.scoring.embeddings.embed_prompts`, no cache, in ``scoring.dtype: auto``'s
   precision) and prints prompts/s. Side by side in the same process, the first
   `--reference` prompts are embedded in batches and one at a time (batch size 1): their
   time ratio and the largest difference of the two; and all prompts again in length-sorted
   batches (``fixed_shapes=False``, what the library did before fixed shapes): the price of
   fixed shapes as ``fixed_vs_sorted`` (the sorted batches' time over the fixed ones', below
   1 when fixed shapes are slower) and the largest difference.
2. Clusters 100,000 random points of SmolLM2's width (576) with `starlora.acquisition.diversity.kmeans`
   into 32, 128 and 500 clusters (500: `typiclust`'s cap), and runs one whole `typiclust`
   query (16 of 100,000, 112 labelled: 128 clusters) and one `diverse_top` (m = 10).

The last line is ``prompts_per_s=<embedding rate> kmeans_s=<seconds for 500 clusters>
fixed_vs_sorted=<ratio>``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from shared_data import DATA as SHARED_DATA  # noqa: E402  (benchmarks/shared_data.py)

from starlora.acquisition.diversity import diverse_top, kmeans, typiclust  # noqa: E402
from starlora.datafiles import load_examples  # noqa: E402
from starlora.models import load_model, tune_cpu_allocator  # noqa: E402
from starlora.scoring.embeddings import embed_prompts  # noqa: E402
from starlora.scoring.options import resolve_dtype  # noqa: E402
from starlora.tasks import get_task  # noqa: E402

DATA = SHARED_DATA


def pool_prompts(task_name: str, n: int, tokenizer) -> list[list[int]]:
    task = get_task(task_name)
    if task_name == "arith":
        examples = task.generate("train", n, 0)
    else:
        examples = load_examples(DATA / task_name / "train.jsonl", task)[:n]
    return [task.prompt_ids(tokenizer, ex, 1024) for ex in examples]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--task", default="arith", choices=["arith", "gsm8k", "boolq", "obqa"])
    parser.add_argument("--prompts", type=int, default=10_000)
    parser.add_argument("--reference", type=int, default=128,
                        help="prompts also embedded one at a time, for the side-by-side ratio")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--points", type=int, default=100_000)
    args = parser.parse_args()

    tune_cpu_allocator()
    loaded = load_model(args.model, device="cpu", dtype="float32")
    model, tokenizer = loaded.model, loaded.tokenizer
    weights = next(model.parameters())
    dtype = resolve_dtype(args.dtype, weights.device, weights.dtype)
    prompts = pool_prompts(args.task, args.prompts, tokenizer)
    tokens = sum(map(len, prompts))
    print(f"{args.model}, {len(prompts)} {args.task} prompts ({tokens / len(prompts):.1f} tokens "
          f"each), {dtype}, {torch.get_num_threads()} threads", flush=True)

    ref = prompts[: args.reference]
    batched, t_batched = timed(lambda: embed_prompts(model, tokenizer, ref, dtype=dtype,
                                                     progress=False))
    single, t_single = timed(lambda: embed_prompts(model, tokenizer, ref, dtype=dtype,
                                                   batch_size=1, progress=False))
    print(f"first {len(ref)}: batched {t_batched:.2f} s, one at a time {t_single:.2f} s, "
          f"batched_vs_one_at_a_time={t_single / t_batched:.2f}, "
          f"max |difference| {np.abs(batched - single).max():.2e}", flush=True)

    emb, seconds = timed(lambda: embed_prompts(model, tokenizer, prompts, dtype=dtype))
    rate = len(prompts) / seconds
    print(f"embedded {emb.shape[0]} prompts of width {emb.shape[1]} in {seconds:.1f} s: "
          f"{rate:.1f} prompts/s, {tokens / seconds:.0f} tokens/s", flush=True)
    emb_sorted, sorted_s = timed(lambda: embed_prompts(model, tokenizer, prompts, dtype=dtype,
                                                       fixed_shapes=False))
    print(f"length-sorted batches: {sorted_s:.1f} s, fixed_vs_sorted={sorted_s / seconds:.2f}, "
          f"max |difference| {np.abs(emb - emb_sorted).max():.2e}", flush=True)

    x = np.random.default_rng(0).standard_normal((args.points, emb.shape[1])).astype(np.float32)
    kmeans_s = {}
    for k in (32, 128, 500):
        labels, kmeans_s[k] = timed(lambda k=k: kmeans(x, k, np.random.default_rng(1)))
        sizes = np.bincount(labels, minlength=k)
        print(f"k-means of {args.points} x {x.shape[1]} into {k}: {kmeans_s[k]:.2f} s "
              f"(cluster sizes {sizes.min()}-{sizes.max()})", flush=True)
    (picked, _), t_typi = timed(lambda: typiclust(x[112:], x[:112], 16,
                                                   np.random.default_rng(2)))
    print(f"typiclust: 16 of {args.points - 112} with 112 labelled: {t_typi:.2f} s", flush=True)
    order = np.random.default_rng(3).permutation(args.points)
    _, t_div = timed(lambda: diverse_top(order, x, 16, 10, np.random.default_rng(4)))
    print(f"diverse_top: 16 of the top 160 of {args.points}: {t_div:.3f} s", flush=True)
    print(f"prompts_per_s={rate:.1f} kmeans_s={kmeans_s[500]:.2f} "
          f"fixed_vs_sorted={sorted_s / seconds:.2f}")


if __name__ == "__main__":
    sys.exit(main())
