"""Batched generation (`starlora.generation.generate`) against one-at-a-time ``model.generate``.

Both sides greedily answer the same GSM8K test prompts with the same model, one after the
other in one process (repeated in alternation with ``--repeats``); the reference calls
``model.generate`` once per prompt (batch 1, no padding), ours sorts prompts by length into
left-padded batches with a KV cache and stops each row at its own EOS.

    python benchmarks/generation.py --model smollm2-135m-instruct --limit 64

Prints seconds and generated tokens per second of each side, and as its last line
``ours_vs_reference=<ratio> same_outputs=<fraction>``: the time ratio and the fraction of
prompts whose greedy token ids are identical. Rows of a padded batch see other rows' padding
in their attention softmax only as exact zeros, but the matmuls run on other shapes, so float
rounding can flip a near-tie between two tokens; those prompts then differ from there on.

``--lm-eval N`` compares ours with lm-evaluation-harness instead of the one-at-a-time reference:
``HFLM(pretrained=model, batch_size=--batch-size).generate_until`` on the same N prompts (the
task's prompt strings, which lm-eval tokenises to the same ids: checked), greedy, at most
``--max-new-tokens`` tokens, stopping at the same stop tokens (as strings, ``until``), both
sides on the same model in the same dtype (``--dtype``), timed in alternation ``--repeats``
times (medians; the speed-up is the median of the paired ratios). ``--profile`` adds a
``torch.profiler`` summary of each side on one batch (the first ``--batch-size`` prompts). The last line reads
``ours_vs_lm_eval=<ratio> same_outputs=<fraction of identical texts>``.

    python benchmarks/generation.py --lm-eval 64 --dtype bfloat16 --repeats 3
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

from starlora.datafiles import load_examples  # noqa: E402
from starlora.generation import generate, stop_tokens  # noqa: E402
from starlora.models import load_model, tune_cpu_allocator  # noqa: E402
from starlora.tasks import get_task  # noqa: E402

DATA = SHARED_DATA / "gsm8k" / "test.jsonl"


@torch.inference_mode()
def one_at_a_time(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """The reference: ``model.generate`` per prompt, greedy, stopping at the same tokens."""
    stop = stop_tokens(model, tokenizer)
    out = []
    for p in prompts:
        ids = torch.tensor([p], device=model.device)
        seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=stop,
                             pad_token_id=tokenizer.pad_token_id)[0, len(p):].tolist()
        n = next((k + 1 for k, t in enumerate(seq) if t in stop), len(seq))
        out.append(seq[:n])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--prompt-style", default="chat", choices=["plain", "chat"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, or auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "auto", "bfloat16"],
                        help="both sides (auto = what a run loads: bf16 on GPUs)")
    parser.add_argument("--lm-eval", type=int, default=0, metavar="N",
                        help="instead: ours against lm-eval's generate_until on N prompts")
    parser.add_argument("--profile", action="store_true",
                        help="with --lm-eval: a torch.profiler summary of each side on one batch")
    args = parser.parse_args()
    if args.lm_eval:
        from generation_lm_eval import lm_eval_mode

        return lm_eval_mode(args)
    tune_cpu_allocator()
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    task = get_task("gsm8k", prompt_style=args.prompt_style)
    examples = load_examples(args.data, task, limit=args.limit)
    prompts = [task.prompt_ids(tokenizer, ex) for ex in examples]
    times: dict[str, list[float]] = {"reference": [], "ours": []}
    outputs: dict[str, list[list[int]]] = {}
    for _ in range(args.repeats):
        for side in ("reference", "ours"):
            t0 = time.perf_counter()
            if side == "reference":
                outputs[side] = one_at_a_time(model, tokenizer, prompts, args.max_new_tokens)
            else:
                # length-sorted batches (below fp32 the library's default is fixed shapes)
                outputs[side] = generate(model, tokenizer, prompts,
                                         max_new_tokens=args.max_new_tokens,
                                         batch_size=args.batch_size, progress=False,
                                         fixed_shapes=False).tokens
            times[side].append(time.perf_counter() - t0)
    for side, ts in times.items():
        tokens = sum(len(t) for t in outputs[side])
        s = statistics.median(ts)
        print(f"{side:>9}: {s:.2f} s median of {len(ts)}, {tokens} tokens, {tokens / s:.1f} tok/s",
              file=sys.stderr)
    same = sum(a == b for a, b in zip(outputs["reference"], outputs["ours"])) / len(prompts)
    ratio = statistics.median(times["reference"]) / statistics.median(times["ours"])
    print(f"prompts={len(prompts)} max_new_tokens={args.max_new_tokens} "
          f"batch_size={args.batch_size} torch_threads={torch.get_num_threads()} "
          f"device={model.device} dtype={model.dtype}", file=sys.stderr)
    print(f"ours_vs_reference={ratio:.2f} same_outputs={same:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
