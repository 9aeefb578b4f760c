"""`generation.py --lm-eval N`: our batched greedy generation against lm-eval's ``generate_until``.

See `benchmarks/generation.py` for what is compared. Also printed: each side's generated
tokens, the tokens lm-eval's prompt encoding gives (checked against ours), and ours' fraction
of the measured matmul rate (`lm_eval_sides.model_flops` over prompt and generated tokens,
the LM head at generated positions; decoding a small batch is bound by reading the weights,
not by matmul throughput, so this fraction is low by nature).
"""

from __future__ import annotations

import argparse
import os
import statistics

import numpy as np
import torch
from lm_eval_sides import (
    alternate,
    generate_requests,
    hflm,
    lm_eval_version,
    model_flops,
    paired_ratio,
    profile_table,
)
from scoring import matmul_rates

from starlora.datafiles import load_examples
from starlora.generation import Generated, generate, stop_tokens
from starlora.models import load_model, tune_cpu_allocator
from starlora.tasks import get_task


def load() -> str:
    """The 1/5/15-minute load averages, as one string."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def lm_eval_mode(args: argparse.Namespace) -> int:
    """Time ours and lm-eval's generate_until side by side; prints the ratio last."""
    version = lm_eval_version()
    tune_cpu_allocator()
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    model, tok = loaded.model, loaded.tokenizer
    model.eval()
    task = get_task("gsm8k", prompt_style=args.prompt_style)
    examples = load_examples(args.data, task, limit=args.lm_eval)
    prompts = [task.prompt_ids(tok, ex) for ex in examples]
    contexts = [task.prompt(ex, tok) for ex in examples]
    stop = stop_tokens(model, tok)
    until = [tok.decode([t]) for t in stop]
    lm = hflm(model, tok, args.batch_size)
    requests = generate_requests(contexts, until, args.max_new_tokens)
    same_prompts = sum(lm.tok_batch_encode([c])[0][0].tolist() == p
                       for c, p in zip(contexts, prompts))
    dtype = next(model.parameters()).dtype
    print(f"device={model.device} threads={torch.get_num_threads()} model={args.model} "
          f"dtype={dtype} (both sides) prompts={len(prompts)} prompt_tokens="
          f"{sum(map(len, prompts))} max_new_tokens={args.max_new_tokens} "
          f"batch_size={args.batch_size} (both sides) until={until} lm_eval={version} "
          f"same_prompt_ids={same_prompts}/{len(prompts)} loadavg={load()}")

    # length-sorted batches, as lm-eval's: below fp32 the library's default is fixed shapes
    # (answers independent of their batch-mates, slower: benchmarks/batch_invariance.py)
    def ours() -> Generated:
        return generate(model, tok, prompts, max_new_tokens=args.max_new_tokens,
                        batch_size=args.batch_size, progress=False, fixed_shapes=False)

    def theirs() -> list[str]:
        return lm.generate_until(requests, disable_tqdm=True)

    # warm-up: both sides on two prompts, a few tokens
    generate(model, tok, prompts[:2], max_new_tokens=4, progress=False)
    lm.generate_until(generate_requests(contexts[:2], until, 4), disable_tqdm=True)

    kind = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    rates = matmul_rates(model.device, seconds=2.0, dtype=kind)
    times, results = alternate({"lm_eval": theirs, "ours": ours}, args.repeats,
                               between=lambda: rates.extend(matmul_rates(model.device, 2.0, kind)))
    sustained = float(np.median(rates))
    lengths = [len(p) for p in prompts]
    generated = [len(t) for t in results["ours"].tokens]
    need = model_flops(model, [p + g for p, g in zip(lengths, generated)], sum(generated))
    for name in ("lm_eval", "ours"):
        s = statistics.median(times[name])
        print(f"{name:>7}: {s:.2f} s (median of {', '.join(f'{t:.2f}' for t in times[name])}) "
              f"prompts/s={len(prompts) / s:.2f} matmul_rate_fraction={need / s / sustained:.3f} "
              f"(of {sustained / 1e9:.1f} GFLOP/s sustained, {len(rates)} products)")
    print(f"ours generated {sum(generated)} tokens (stop tokens included)")
    texts = results["ours"].texts
    same = [a == b for a, b in zip(texts, results["lm_eval"])]
    differ = [i for i, s in enumerate(same) if not s]
    print(f"identical texts: {sum(same)}/{len(same)}; differing prompts: {differ[:10]}"
          + (f" (first: ours {texts[differ[0]][:80]!r} lm_eval "
             f"{results['lm_eval'][differ[0]][:80]!r})" if differ else ""))
    if args.profile:  # one batch: a whole call's events took 21 GB (the OOM killer's count)
        n = args.batch_size
        sides = (("ours", lambda: generate(model, tok, prompts[:n], progress=False,
                                           max_new_tokens=args.max_new_tokens, batch_size=n,
                                           fixed_shapes=False)),
                 ("lm_eval", lambda: lm.generate_until(requests[:n], disable_tqdm=True)))
        for name, fn in sides:
            print(f"torch.profiler, {name} on the first {n} prompts (one batch):\n"
                  f"{profile_table(fn)}")
    print(f"loadavg at the end: {load()}")
    ratio = paired_ratio(times["lm_eval"], times["ours"])
    print(f"ours_vs_lm_eval={ratio:.2f} same_outputs={sum(same) / len(same):.3f}")
    return 0
