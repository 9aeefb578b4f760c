"""Do a prompt's greedy answer and its batch-mates depend on each other? fp32 against bf16.

    OMP_NUM_THREADS=1 python benchmarks/batch_invariance.py [--limit 64]

Issue 37 leaves label-free generation in fp32 because bf16 answers "depend on the batch". This
measures that claim. First, on single operations in each dtype: one linear layer of SmolLM2's
MLP shape on the first M of 64 rows (are rows' outputs the same bits for every M = 1..64?),
and attention of one query over 30 keys against the same 30 keys padded to 40 and masked (the
padding a longer batch-mate brings). Then on the model: `starlora.generation.generate`
(greedy, `--max-new-tokens`, length-sorted batches: ``fixed_shapes=False``) of `--limit`
arith pool prompts, alone (batch size 1, the reference), in batches of 8, in one batch of `--limit`, and in batches of 8 after a shuffle
(other batch-mates), counting the prompts whose tokens differ from alone's; with the seconds
each took.

Then bf16 with **fixed shapes** (``generate(fixed_shapes=True)``, the library's default below
fp32): every shape a row sees set by the row alone. A prompt is left-padded to a bucket of its
own length (the next multiple of `starlora.generation.BUCKET` tokens above it, so that every
row has padding and takes the masked attention path), batched only with prompts of its
bucket, every batch is `--rows` rows (short ones filled with copies of their first prompt)
and finished rows keep decoding. Alone (its own batch, the other rows copies of it) against
the prompts in order and shuffled (other batch-mates where lengths tie). Last line: ``fp32_differ=<n>/<limit> bf16_differ=<n>/<limit>
fixed_bf16_differ=<n>/<limit> bf16_vs_fp32=<fp32 s / bf16 s, batches of 8>
fixed_bf16_vs_fp32=<fp32 s, batches of 8 / fixed-shape bf16 s, in order>``: the most prompts
any batched side changed.

``--speed``: timings only, at the run layer's own batch size: `--limit` prompts generated
(greedy, `--max-new-tokens`) in fp32 and in bf16 in length-sorted batches (`--rows` rows,
stopped rows dropped: ``generate(fixed_shapes=False)``), and in bf16 with the library's fixed
shapes (``generate(fixed_shapes=True)``: `--rows` rows a batch, buckets of
`starlora.generation.BUCKET` tokens, the default below fp32), each once; plus how many prompts' bf16 answers differ from fp32's. Last
line: ``bf16_vs_fp32=<fp32 s / bf16 s> fixed_bf16_vs_fp32=<fp32 s / fixed-shape bf16 s>
bf16_answers_differ=<n>/<limit>``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import torch

from starlora.generation import BUCKET, generate
from starlora.models import load_model
from starlora.tasks import get_task

SHAPE = (1536, 576)  # SmolLM2-135M: intermediate_size x hidden_size


def ops(dtype: torch.dtype) -> str:
    """Which M of 1..64 change a row's linear output, and whether masked padding changes
    attention."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(*SHAPE, generator=g).to(dtype)
    x = torch.randn(64, SHAPE[1], generator=g).to(dtype)
    ref = torch.nn.functional.linear(x, w)
    other = [m for m in range(1, 64) if not torch.equal(torch.nn.functional.linear(x[:m], w),
                                                         ref[:m])]
    q, k, v = (torch.randn(1, 9, n, 64, generator=g).to(dtype) for n in (1, 40, 40))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    mask = torch.zeros(1, 1, 1, 40, dtype=torch.bool)
    mask[..., :30] = True
    same = torch.equal(sdpa(q, k[:, :, :30], v[:, :, :30]), sdpa(q, k, v, attn_mask=mask))
    return (f"linear: rows differ from M=64's at M in {other or 'none'}; "
            f"attention over 30 keys == padded to 40 and masked: {same}")


def speed(args: argparse.Namespace, task) -> int:
    """The ``--speed`` mode (module doc)."""
    seconds, tokens = {}, {}
    for name in ("float32", "bfloat16"):
        loaded = load_model(args.model, dtype=name)
        model, tok = loaded.model.eval(), loaded.tokenizer
        prompts = [task.prompt_ids(tok, ex) for ex in task.generate("train", args.limit, 0)]
        t = time.perf_counter()
        tokens[name] = generate(model, tok, prompts, max_new_tokens=args.max_new_tokens,
                                batch_size=args.rows, progress=False,
                                fixed_shapes=False).tokens
        seconds[name] = time.perf_counter() - t
        print(f"{name}, batches of {args.rows} (stopped rows dropped): {seconds[name]:.1f} s, "
              f"{sum(map(len, tokens[name])) / len(prompts):.1f} tokens an answer", flush=True)
    t = time.perf_counter()  # the library's fixed shapes (buckets of generation.BUCKET tokens)
    generate(model, tok, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.rows,
             progress=False, fixed_shapes=True)
    seconds["fixed"] = time.perf_counter() - t
    buckets = sorted({(len(p) // BUCKET + 1) * BUCKET for p in prompts})
    print(f"bfloat16, fixed shapes ({args.rows} rows, buckets {buckets}): "
          f"{seconds['fixed']:.1f} s", flush=True)
    differ = sum(a != b for a, b in zip(tokens["float32"], tokens["bfloat16"]))
    print(f"bf16_vs_fp32={seconds['float32'] / seconds['bfloat16']:.2f} "
          f"fixed_bf16_vs_fp32={seconds['float32'] / seconds['fixed']:.2f} "
          f"bf16_answers_differ={differ}/{len(prompts)}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--rows", type=int, default=8, help="fixed shapes: rows a batch")
    ap.add_argument("--speed", action="store_true", help="timings only (module doc)")
    args = ap.parse_args()
    task = get_task("arith")
    if args.speed:
        return speed(args, task)
    differ, seconds = {}, {}
    for name in ("float32", "bfloat16"):
        dtype = getattr(torch, name)
        print(f"{name} ops: {ops(dtype)}", flush=True)
        loaded = load_model(args.model, dtype=name)
        model, tok = loaded.model.eval(), loaded.tokenizer
        prompts = [task.prompt_ids(tok, ex) for ex in task.generate("train", args.limit, 0)]
        order = list(range(len(prompts)))
        random.Random(0).shuffle(order)
        sides = {"alone": (prompts, 1, None), "batches of 8": (prompts, 8, None),
                 f"one batch of {len(prompts)}": (prompts, len(prompts), None),
                 "batches of 8, shuffled": ([prompts[i] for i in order], 8, order)}
        got = {}
        for side, (ps, bs, perm) in sides.items():
            t = time.perf_counter()
            tokens = generate(model, tok, ps, max_new_tokens=args.max_new_tokens,
                              batch_size=bs, progress=False, fixed_shapes=False).tokens
            seconds[(name, side)] = time.perf_counter() - t
            if perm is not None:  # back to the prompts' order
                back = [None] * len(ps)
                for j, i in enumerate(perm):
                    back[i] = tokens[j]
                tokens = back
            got[side] = tokens
        differ[name] = 0
        for side in list(sides)[1:]:
            n = sum(a != b for a, b in zip(got[side], got["alone"]))
            differ[name] = max(differ[name], n)
            print(f"{name} {side}: {n}/{len(prompts)} prompts' tokens differ from alone's "
                  f"({seconds[(name, side)]:.1f} s; alone {seconds[(name, 'alone')]:.1f} s)",
                  flush=True)
    fixed = {}  # the model is bf16 here (the loop's last dtype); the library's fixed shapes

    def fixed_tokens(ps: list[list[int]]) -> list[list[int]]:
        return generate(model, tok, ps, max_new_tokens=args.max_new_tokens,
                        batch_size=args.rows, progress=False, fixed_shapes=True).tokens

    shuffle = random.Random(1).sample(range(len(prompts)), len(prompts))
    for side in ("alone", "in order", "shuffled"):
        t = time.perf_counter()
        if side == "alone":  # each prompt in a batch of its own copies
            fixed[side] = [fixed_tokens([p])[0] for p in prompts]
        elif side == "in order":
            fixed[side] = fixed_tokens(prompts)
        else:  # other batch-mates where lengths tie; back to the prompts' order
            got_shuffled = fixed_tokens([prompts[i] for i in shuffle])
            fixed[side] = [None] * len(prompts)
            for j, i in enumerate(shuffle):
                fixed[side][i] = got_shuffled[j]
        seconds[("fixed", side)] = time.perf_counter() - t
    differ["fixed"] = 0
    for side in ("in order", "shuffled"):
        n = sum(a != b for a, b in zip(fixed[side], fixed["alone"]))
        differ["fixed"] = max(differ["fixed"], n)
        print(f"bfloat16, fixed shapes ({args.rows} rows, buckets of {BUCKET} tokens) "
              f"{side}: {n}/{len(prompts)} prompts' tokens differ from alone's "
              f"({seconds[('fixed', side)]:.1f} s; alone {seconds[('fixed', 'alone')]:.1f} s)",
              flush=True)
    base = seconds[("float32", "batches of 8")]
    print(f"fp32_differ={differ['float32']}/{args.limit} bf16_differ={differ['bfloat16']}/"
          f"{args.limit} fixed_bf16_differ={differ['fixed']}/{args.limit} "
          f"bf16_vs_fp32={base / seconds[('bfloat16', 'batches of 8')]:.2f} "
          f"fixed_bf16_vs_fp32={base / seconds[('fixed', 'in order')]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
