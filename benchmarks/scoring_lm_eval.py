"""`scoring.py --lm-eval N`: our scorer against lm-evaluation-harness on the same N items, timed.

Both sides score the gold answers of the same N GSM8K items with the same model (LoRA attached,
as in a round; ``--lora-r 0``: none), in one process, in the same dtype (``--dtype``; default
bfloat16 in this mode):

* ours: `score_examples`, PE and ME, one deterministic pass, ``dtype=`` the compared dtype (an
  fp32 model whose weights the call casts, as ``scoring.dtype`` does in a run: the cast is
  timed, on our side);
* lm-eval: ``HFLM(pretrained=<the model, or its bf16 copy>, batch_size=8).loglikelihood`` on
  ``(prompt, answer)`` strings, the way a user calls it (it tokenises, pads to the longest in
  each batch of 8 and takes a full-vocabulary log-softmax at every position).

lm-eval moves a prompt's trailing whitespace (the chat template's final newline) to the
continuation; ours is given the same split (`lm_eval_sides.lm_eval_split`), so both score the
same tokens (checked, and printed). The sides alternate ``--repeats`` times with matmul probes
in between; times are medians, the speed-up the median of the paired ratios. Also printed: the
agreement of the log-likelihoods (ours -PE against lm-eval's), the matmul work each side needs
(``lm_eval_sides.model_flops``; lm-eval's with its padding and LM head at every position) and
each side's fraction of the measured matmul rate in the compared dtype. ``--profile`` adds a
``torch.profiler`` summary of one call of each side. The last line reads
``ours_vs_lm_eval=<ratio> roofline_fraction=<ours' fraction of the sustained matmul rate>``.

    python benchmarks/scoring.py --lm-eval 96 --dtype bfloat16 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import os
from collections.abc import Callable

import numpy as np
import torch
from lm_eval_sides import (
    alternate,
    hflm,
    lm_eval_split,
    lm_eval_version,
    loglikelihood_requests,
    model_flops,
    paired_ratio,
    profile_table,
)

from starlora.adapters import attach_lora
from starlora.datafiles import load_examples
from starlora.models import load_model, tune_cpu_allocator
from starlora.scoring import score_examples
from starlora.tasks import get_task

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def lm_eval_padded(lengths: list[int], batch_size: int) -> int:
    """Tokens lm-eval's forwards hold: requests sorted longest first, batches of
    `batch_size` right-padded to their longest (its input drops each sequence's last token)."""
    inputs = sorted((n - 1 for n in lengths), reverse=True)
    return sum(inputs[i] * len(inputs[i : i + batch_size])
               for i in range(0, len(inputs), batch_size))


def lm_eval_mode(args: argparse.Namespace, matmul_rates: Callable[..., list[float]]) -> None:
    """Time ours and lm-eval's loglikelihood side by side (module doc); prints the ratio last."""
    version = lm_eval_version()
    dtype_name = args.dtype or "bfloat16"
    dtype = DTYPES[dtype_name]
    if args.device == "cpu" and not args.default_allocator:
        tune_cpu_allocator()
    torch.manual_seed(0)
    loaded = load_model(args.model, device=args.device)
    model, tok = loaded.model, loaded.tokenizer
    if args.lora_r:
        model = attach_lora(model, r=args.lora_r, dropout=args.lora_dropout)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # a trained adapter is not zero
                p.data.normal_(0, 1e-3)
    model.eval()
    device = next(model.parameters()).device
    base_task = get_task(args.task)
    task = lm_eval_split(base_task)
    examples = load_examples(args.data, base_task, limit=args.lm_eval)
    theirs_model = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    lm = hflm(theirs_model, tok, args.lm_eval_batch_size)
    pairs = [(base_task.prompt(ex, tok), base_task.target(ex.answer)) for ex in examples]
    requests = loglikelihood_requests(pairs)

    enc = [task.encode(tok, ex) for ex in examples]
    same_tokens = sum(lm._encode_pair(c, a) == e for (c, a), e in zip(pairs, enc))
    lengths = [len(p) + len(a) for p, a in enc]
    answer_tokens = sum(len(a) for _, a in enc)
    padded = lm_eval_padded(lengths, args.lm_eval_batch_size)
    print(f"device={device} threads={torch.get_num_threads()} model={args.model} "
          f"dtype={dtype_name} (both sides) lora_r={args.lora_r} task={args.task} "
          f"items={len(examples)} tokens={sum(lengths)} answer_tokens={answer_tokens} "
          f"lm_eval={version} lm_eval_batch_size={args.lm_eval_batch_size} "
          f"same_token_pairs={same_tokens}/{len(examples)} "
          f"loadavg={' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    def ours():
        return score_examples(model, tok, task, examples, measures=("pe", "me"), mc_passes=1,
                              max_tokens_per_batch=args.max_tokens_per_batch, progress=False,
                              dtype=dtype_name)

    def theirs():
        return np.array([ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)])

    # warm-up both sides on their two shortest items
    short = sorted(range(len(examples)), key=lambda i: lengths[i])[:2]
    score_examples(model, tok, task, [examples[i] for i in short], progress=False,
                   dtype=dtype_name)
    lm.loglikelihood([requests[i] for i in short], disable_tqdm=True)

    rates = matmul_rates(device, dtype=dtype)
    times, results = alternate({"lm_eval": theirs, "ours": ours}, args.repeats,
                               between=lambda: rates.extend(matmul_rates(device, dtype=dtype)))
    peak, sustained = max(rates), float(np.median(rates))
    kind = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    print(f"matmul rate ({kind}): peak {peak / 1e9:.1f} GFLOP/s (best single product), "
          f"sustained {sustained / 1e9:.1f} GFLOP/s (median of {len(rates)} products)")

    need = model_flops(model, lengths, answer_tokens)
    # lm-eval's forwards: the body over its padded batches, the head at every position
    theirs_flops = (model_flops(model, lengths, 0) * padded / sum(lengths)
                    + 2.0 * model.get_output_embeddings().weight.numel() * padded)
    fractions = {}
    for name, flops, what in (
        ("ours", need, "PE+ME, packed length-sorted batches, LM head at answer positions"),
        ("lm_eval", theirs_flops, f"loglikelihood, batches of {args.lm_eval_batch_size} "
         f"padded to {padded} tokens ({padded / sum(lengths) - 1:.1%} padding), "
         "full log-softmax at every position"),
    ):
        s = float(np.median(times[name]))
        fractions[name] = need / s / sustained
        print(f"{name}: {what}\n  {name}: {s:.2f}s (median of "
              f"{', '.join(f'{t:.2f}' for t in times[name])}) items/s={len(examples) / s:.2f} "
              f"matmul work {flops / 1e12:.2f} TFLOP, needed {need / 1e12:.2f} TFLOP -> "
              f"roofline_fraction={fractions[name]:.3f} of sustained, {need / s / peak:.3f} of peak")
    print(f"work ratio lm_eval/ours = {theirs_flops / need:.2f} (the speed-up if both ran their "
          "matmuls at the same rate)")
    theirs_ll, ours_pe = results["lm_eval"], results["ours"].pe
    diff = np.abs(-ours_pe - theirs_ll) / np.abs(theirs_ll)
    print(f"agreement ({dtype_name}, both sides): max relative difference of the "
          f"log-likelihoods {diff.max():.2e} (median {np.median(diff):.2e}); ours "
          f"{-ours_pe[:3].round(4)}, lm_eval {theirs_ll[:3].round(4)} ...")
    if args.profile:
        for name, fn in (("ours", ours), ("lm_eval", theirs)):
            print(f"torch.profiler, one call of {name}:\n{profile_table(fn)}")
    ratio = paired_ratio(times["lm_eval"], times["ours"])
    print(f"loadavg at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"ours_vs_lm_eval={ratio:.2f} roofline_fraction={fractions['ours']:.3f}")
