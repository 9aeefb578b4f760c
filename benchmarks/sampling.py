"""K sampled answers per prompt: one prefill shared by the K rows against K prefills.

Both sides sample K answers (temperature 1, torch seeded per prompt) to each of the same GSM8K
test prompts with the same model, one prompt's K rows per batch, in one process, alternated
``--repeats`` times (medians):

    repeated   ``decode`` on K copies of the prompt: the prompt is prefilled K times (what
               ``generate(num_return_sequences=K)`` does too: it repeats the inputs first)
    shared     ``decode(..., repeat=K)``: the prompt is prefilled once and its KV cache rows
               copied K times (what `starlora.generation.generate` does for samples)

    python benchmarks/sampling.py --limit 16 --samples 5

Prints each side's seconds, the prompt and generated token counts, and as its last line
``shared_vs_repeated=<time ratio, repeated / shared> same_outputs=<fraction of prompts whose
K samples are identical on both sides>``. The draws are the same; the prefill's matmuls run
on 1 row instead of K, which can change the logits' last bits and so, rarely, a sampled token.

``--prompts-per-batch P`` compares instead, through `starlora.generation.generate` (seeds
0..n-1), one prompt's samples a batch (``alone``, `generate`'s default) against P prompts'
samples a batch (``together``, its ``groups``, as a run's pool scoring forms them with
``evaluation.batch_size`` = P x K);
last line ``together_vs_alone=<alone / together> same_outputs=<...>``. ``--task arith`` takes
the study's generated arith prompts (plain style) instead of GSM8K's::

    python benchmarks/sampling.py --task arith --limit 32 --max-new-tokens 48 --prompts-per-batch 6
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from shared_data import DATA as SHARED_DATA  # noqa: E402  (benchmarks/shared_data.py)

from starlora.attention import attention_kernels  # noqa: E402
from starlora.datafiles import load_examples  # noqa: E402
from starlora.generation import decode, generate, stop_tokens  # noqa: E402
from starlora.models import load_model, tune_cpu_allocator  # noqa: E402
from starlora.tasks import get_task  # noqa: E402

DATA = SHARED_DATA / "gsm8k" / "test.jsonl"


def side(model, prompts: list[list[int]], k: int, shared: bool, **kw) -> list[list[list[int]]]:
    """Each prompt's K sampled token lists, torch seeded by the prompt's index."""
    out = []
    for i, p in enumerate(prompts):
        ids = torch.tensor([p], device=model.device)
        torch.manual_seed(i)
        if shared:
            got = decode(model, ids, torch.ones_like(ids), repeat=k, **kw)
        else:
            rows = ids.repeat(k, 1)
            got = decode(model, rows, torch.ones_like(rows), **kw)
        out.append(got.tokens)
    return out


def batches(model, tokenizer, prompts: list[list[int]], k: int, per_batch: int,
            max_new_tokens: int) -> list[list[list[int]]]:
    """Each prompt's K sampled token lists from `generate`, `per_batch` prompts a batch
    (groups of consecutive prompts, longest first, as `starlora.run.pool_scores` cuts
    them)."""
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    groups = [0] * len(prompts)
    for n, i in enumerate(order):
        groups[i] = n // per_batch
    out = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, samples=k,
                   temperature=1.0, seeds=list(range(len(prompts))), progress=False,
                   groups=groups)
    return [[out.tokens[j] for j in out.of(i)] for i in range(len(prompts))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "auto", "bfloat16"])
    parser.add_argument("--task", default="gsm8k", choices=["gsm8k", "arith"])
    parser.add_argument("--prompts-per-batch", type=int, default=None,
                        help="compare generate's batches of one prompt and of this many")
    args = parser.parse_args()
    tune_cpu_allocator()
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    if args.task == "arith":
        task = get_task("arith")
        examples = task.generate("test", args.limit, 0)
    else:
        task = get_task("gsm8k", prompt_style="chat")
        examples = load_examples(args.data, task, limit=args.limit)
    prompts = [task.prompt_ids(tokenizer, ex) for ex in examples]
    kw = dict(max_new_tokens=args.max_new_tokens, stop=stop_tokens(model, tokenizer),
              pad=tokenizer.pad_token_id or 0, temperature=1.0)
    names = ("repeated", "shared") if args.prompts_per_batch is None else ("alone", "together")
    times: dict[str, list[float]] = {name: [] for name in names}
    outputs: dict[str, list] = {}
    with torch.inference_mode(), attention_kernels(model.device):
        for _ in range(args.repeats):
            for name in times:
                t0 = time.perf_counter()
                if args.prompts_per_batch is None:
                    outputs[name] = side(model, prompts, args.samples, name == "shared", **kw)
                else:
                    outputs[name] = batches(model, tokenizer, prompts, args.samples,
                                            1 if name == "alone" else args.prompts_per_batch,
                                            args.max_new_tokens)
                times[name].append(time.perf_counter() - t0)
    generated = sum(len(t) for rows in outputs[names[1]] for t in rows)
    print(f"prompts={len(prompts)} samples={args.samples} prompt_tokens="
          f"{sum(map(len, prompts))} generated_tokens={generated} max_new_tokens="
          f"{args.max_new_tokens} torch_threads={torch.get_num_threads()} "
          f"device={model.device} dtype={model.dtype}")
    for name, ts in times.items():
        print(f"{name:>9}: {statistics.median(ts):.2f} s median of {len(ts)} "
              f"({', '.join(f'{t:.2f}' for t in ts)})")
    same = sum(a == b for a, b in zip(outputs[names[0]], outputs[names[1]])) / len(prompts)
    ratio = statistics.median(times[names[0]]) / statistics.median(times[names[1]])
    print(f"{names[1]}_vs_{names[0]}={ratio:.2f} same_outputs={same:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
