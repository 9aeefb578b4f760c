"""Scoring throughput: the STAR authors' style of scorer against `starlora.scoring`, in one run.

Both sides score the same items with the same model (with a LoRA adapter attached, as in an
active-learning round), compute PE and ME, and run K passes:

* reference: one example at a time, logits for the whole sequence, then a Python loop over the
  answer tokens that copies each position's full softmax to NumPy (the authors' code); its K
  passes run in eval mode, as theirs do, so they are identical;
* ours: `score_examples` with ``mc_passes=K`` (LoRA dropout really sampling).

The two sides alternate `--repeats` times, with a few seconds of large matmuls between them, so
that both see the same load on a shared machine; times are medians over the repeats and the
speed-up is the median of the paired ratios. For each side it prints examples/s, useful
tokens/s (prompt + answer tokens, no padding, times K) and the roofline fraction = useful tokens
x 2 x parameters / seconds / matmul FLOP/s. The matmul rate is measured here (fp32 on CPU, bf16
on GPU) in two ways: `peak`, the best single product, and `sustained`, the median product
across all probes; the fraction is given against both, and the last line, which reads
``ours_vs_reference=<ratio> roofline_fraction=<fraction>``, uses the sustained rate.

With ``--dtype bfloat16`` ours scores in bf16 (`ScoringOptions.dtype`: a bf16 copy of the
model, made inside every timed call) while the reference stays in fp32, and the matmul rate is
measured in bf16. Ours is then also run in fp32 with the same seed on the first
``--rank-items`` items (default: the timed ones), and the last line adds
``spearman_vs_fp32=<rho> top25_overlap=<fraction>``: the rank correlation of PE (mean over the
passes) between bf16 and fp32, and the overlap of their top-25% PE sets.

    python benchmarks/scoring.py --model smollm2-135m-instruct --limit 24 --mc-passes 3
    python benchmarks/scoring.py --limit 24 --mc-passes 3 --dtype bfloat16 --rank-items 200

``--processes 1,2`` measures scaling out instead: for each count P it launches ``torchrun
--standalone --nproc-per-node P`` on this file (CPU, gloo, one thread per process), each
process scores its share of the items (`starlora.distributed.map_shards`, as the CLI and the
run loop do) with ``mc_passes=K``, and the main process times the whole call, gathering
included, from a barrier to the gathered result (median over `--repeats`). It prints
examples/s per P side by side, checks that every P gives the same scores, and ends with
``processes_<P>_vs_<first>=<ratio>`` (examples/s ratio; the last line is the largest P).

    python benchmarks/scoring.py --processes 1,2 --limit 48 --mc-passes 3

``--lm-eval N`` compares ours with lm-evaluation-harness instead (``HFLM.loglikelihood`` at
batch size 8, the same N items, tokens and dtype, timed side by side; see
`benchmarks/scoring_lm_eval.py`) and ends with ``ours_vs_lm_eval=<ratio>``.

    python benchmarks/scoring.py --lm-eval 96 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from shared_data import DATA as SHARED_DATA  # noqa: E402  (benchmarks/shared_data.py)

from starlora import distributed as dist  # noqa: E402
from starlora.adapters import attach_lora  # noqa: E402
from starlora.datafiles import load_examples  # noqa: E402
from starlora.models import load_model, tune_cpu_allocator  # noqa: E402
from starlora.scoring import score_examples  # noqa: E402
from starlora.tasks import get_task  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rates(device: torch.device, seconds: float = 3.0,
                 dtype: torch.dtype | None = None) -> list[float]:
    """FLOP/s of each large square matmul run for `seconds` (`dtype`; default fp32 on CPU,
    bf16 on GPU)."""
    n = 2048 if device.type == "cpu" else 8192
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    rates, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        rates.append(2 * n**3 / (time.perf_counter() - t))
    return rates


def reference_scores(model, tokenizer, task, examples, device, passes: int):
    """The authors' style: per example a full forward, then per answer token a full softmax
    copied to NumPy; PE and ME summed in Python. Returns ([N, passes] pe, [N, passes] me)."""
    pe = np.zeros((len(examples), passes))
    me = np.zeros((len(examples), passes))
    model.eval()
    with torch.no_grad():
        for k in range(passes):
            for i, ex in enumerate(examples):
                p, a = task.encode(tokenizer, ex)
                ids = torch.tensor([p + a], device=device)
                logits = model(input_ids=ids).logits[0]
                for j, tok in enumerate(a):
                    probs = torch.softmax(logits[len(p) - 1 + j].float(), -1).cpu().numpy()
                    pe[i, k] -= np.log(probs[tok])
                    me[i, k] -= np.sum(probs * np.log(probs + 1e-30))
    return pe, me


def float64_scores(model, tokenizer, task, examples):
    """PE and ME from a float64 copy of the model, full log-softmax in float64 ([N] each)."""
    ref = copy.deepcopy(model).double().eval()
    pe, me = [], []
    with torch.no_grad():
        for ex in examples:
            p, a = task.encode(tokenizer, ex)
            ids = torch.tensor([p + a], device=next(ref.parameters()).device)
            logp = torch.log_softmax(ref(input_ids=ids).logits[0].double(), -1)
            at = logp[len(p) - 1 : len(p) + len(a) - 1]
            pe.append(-at[torch.arange(len(a)), torch.tensor(a)].sum().item())
            me.append(-(at.exp() * at).sum().item())
    del ref
    return np.array(pe), np.array(me)


#: the arguments a worker of `--processes` passes on to the next
WORKER_ARGS = ("model", "limit", "task", "data", "mc_passes", "measures", "lora_r",
               "lora_dropout", "max_tokens_per_batch", "repeats")


def processes_mode(args: argparse.Namespace) -> None:
    """Launch one torchrun per process count (CPU, one thread each) on `worker_mode`; print
    examples/s side by side and the speed-up of each count over the first."""
    counts = [int(c) for c in args.processes.split(",") if c.strip()]
    if not counts or min(counts) < 1:
        raise SystemExit(f"--processes: a comma-separated list of counts >= 1, got {args.processes!r}")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    passed = []
    for name in WORKER_ARGS:
        value = getattr(args, name)
        if value is not None:
            passed += [f"--{name.replace('_', '-')}", str(value)]
    results = {}
    for count in counts:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(count), __file__, "--worker", *passed]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("worker_result ")]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"{count} process(es): the workers failed (exit {proc.returncode})")
        results[count] = json.loads(lines[-1].split(" ", 1)[1])
    first = results[counts[0]]
    print(f"model={args.model} task={args.task} items={first['items']} passes={first['passes']} "
          f"threads/process=1 device=cpu backend=gloo repeats={args.repeats}")
    rates = {}
    for count in counts:
        r = results[count]
        seconds = float(np.median(r["seconds"]))
        rates[count] = r["items"] * r["passes"] / seconds
        diff = float(np.nanmax(np.abs(np.array(r["pe"]) - np.array(first["pe"]))))
        print(f"processes={count}: {seconds:.2f}s (median of "
              f"{', '.join(f'{t:.2f}' for t in r['seconds'])}) examples/s={rates[count]:.2f} "
              f"(x{r['passes']} passes) max |PE - PE with {counts[0]}| = {diff:.3g}")
    for count in counts[1:]:
        print(f"processes_{count}_vs_{counts[0]}={rates[count] / rates[counts[0]]:.2f}")


def worker_mode(args: argparse.Namespace) -> None:
    """One process of `processes_mode`: its share of the items, timed from a barrier to the
    gathered scores; the main process prints ``worker_result {json}``."""
    torch.set_num_threads(1)
    tune_cpu_allocator()
    dist.setup(cpu=True)
    torch.manual_seed(0)  # the same LoRA weights in every process
    loaded = load_model(args.model, device="cpu")
    model = attach_lora(loaded.model, r=args.lora_r, dropout=args.lora_dropout)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 1e-3)
    tok, task = loaded.tokenizer, get_task(args.task)
    examples = load_examples(args.data, task, limit=args.limit)
    lengths = [len(p) + len(a) for p, a in (task.encode(tok, ex) for ex in examples)]
    measures = tuple(m for m in args.measures.split(",") if m)

    def score(share: list) -> list[float]:
        out = score_examples(model, tok, task, share, measures=measures,
                             mc_passes=args.mc_passes, seed=0, progress=False,
                             max_tokens_per_batch=args.max_tokens_per_batch)
        return [float(x) for x in out.pe]

    score(examples[:1])  # warm-up
    times, pe = [], None
    for _ in range(args.repeats):
        dist.barrier()
        t = time.perf_counter()
        pe = dist.map_shards(score, examples, lengths, to="all")
        times.append(time.perf_counter() - t)
    if dist.is_main():
        print("worker_result " + json.dumps({
            "processes": dist.world_size(), "items": len(examples), "passes": args.mc_passes,
            "seconds": times, "pe": pe}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--limit", type=int, default=24)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--task", default="gsm8k")
    ap.add_argument("--data", default=str(SHARED_DATA / "gsm8k" / "test.jsonl"))
    ap.add_argument("--mc-passes", type=int, default=3)
    ap.add_argument("--measures", default="pe,me")
    ap.add_argument("--lora-r", type=int, default=64)
    ap.add_argument("--lora-dropout", type=float, default=0.1)
    ap.add_argument("--max-tokens-per-batch", type=int, default=None, help="default: by device")
    ap.add_argument("--repeats", type=int, default=3, help="alternations of the two sides")
    ap.add_argument("--default-allocator", action="store_true",
                    help="skip tune_cpu_allocator() (the CLI applies it)")
    ap.add_argument("--lm-eval", type=int, default=0, metavar="N",
                    help="instead: ours against lm-eval's loglikelihood on N items, timed "
                    "(benchmarks/scoring_lm_eval.py; needs the bench extra)")
    ap.add_argument("--lm-eval-batch-size", type=int, default=8)
    ap.add_argument("--profile", action="store_true",
                    help="with --lm-eval: a torch.profiler summary of one call of each side")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="precision of ours (scoring.dtype; default float32); the reference "
                    "stays float32; with --lm-eval both sides (default bfloat16)")
    ap.add_argument("--rank-items", type=int, default=None,
                    help="with --dtype bfloat16: items compared with fp32 (default --limit)")
    ap.add_argument("--float64-check", type=int, default=3,
                    help="compare both sides with a float64 copy of the model on N items")
    ap.add_argument("--processes", help="e.g. 1,2: scaling out over CPU processes instead "
                    "(torchrun, one thread each; see the module doc)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.processes:
        return processes_mode(args)
    if args.worker:
        return worker_mode(args)
    if args.lm_eval:
        from scoring_lm_eval import lm_eval_mode

        return lm_eval_mode(args, matmul_rates)
    args.dtype = args.dtype or "float32"
    allocator = "default"
    if args.device == "cpu" and not args.default_allocator and tune_cpu_allocator():
        allocator = "tuned"  # as the CLI does; both sides run in this process
    measures = tuple(m for m in args.measures.split(",") if m)

    torch.manual_seed(0)
    loaded = load_model(args.model, device=args.device)
    device = next(loaded.model.parameters()).device
    model = attach_lora(loaded.model, r=args.lora_r, dropout=args.lora_dropout)
    # a trained adapter is not zero: give B some weight so the adapter is really applied
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 1e-3)
    tok = loaded.tokenizer
    task = get_task(args.task)
    examples = load_examples(args.data, task, limit=args.limit)
    K = args.mc_passes
    params = sum(p.numel() for p in model.parameters())
    enc = [task.encode(tok, ex) for ex in examples]
    tokens = sum(len(p) + len(a) for p, a in enc)
    answer_tokens = sum(len(a) for _, a in enc)
    print(
        f"device={device} threads={torch.get_num_threads()} model={args.model} "
        f"dtype={next(model.parameters()).dtype} params={params / 1e6:.1f}M "
        f"(incl. LoRA r={args.lora_r}, dropout={args.lora_dropout}) task={args.task} "
        f"items={len(examples)} tokens/pass={tokens} answer_tokens/pass={answer_tokens} passes={K} "
        f"malloc={allocator}"
    )
    pass_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    rates = matmul_rates(device, dtype=pass_dtype)

    # warm-up both paths on one short item
    reference_scores(model, tok, task, examples[:1], device, 1)
    score_examples(model, tok, task, examples[:1], progress=False)

    def timed(fn):
        sync(device)
        t = time.perf_counter()
        result = fn()
        sync(device)
        return time.perf_counter() - t, result

    t_ref, t_ours = [], []
    for _ in range(args.repeats):
        seconds, (ref_pe, ref_me) = timed(
            lambda: reference_scores(model, tok, task, examples, device, K)
        )
        t_ref.append(seconds)
        seconds, ours = timed(
            lambda: score_examples(
                model,
                tok,
                task,
                examples,
                measures=measures,
                mc_passes=K,
                max_tokens_per_batch=args.max_tokens_per_batch,
                progress=False,
                seed=0,
                dtype=args.dtype,
            )
        )
        t_ours.append(seconds)
        rates += matmul_rates(device, dtype=pass_dtype)

    peak, sustained = max(rates), float(np.median(rates))
    kind = {torch.float32: "fp32", torch.bfloat16: "bf16"}[pass_dtype]
    print(
        f"matmul rate ({kind}): peak {peak / 1e9:.1f} GFLOP/s (best single product), sustained "
        f"{sustained / 1e9:.1f} GFLOP/s (median of {len(rates)} products around the runs)"
    )
    useful = tokens * K

    def line(name: str, times: list[float], what: str) -> float:
        seconds = float(np.median(times))
        flops = useful * 2 * params / seconds
        print(
            f"{name}: {what}\n  {name}: {seconds:.2f}s (median of {', '.join(f'{t:.2f}' for t in times)}) "
            f"examples/s={len(examples) * K / seconds:.2f} (x{K} passes) "
            f"useful_tokens/s={useful / seconds:.1f} roofline_fraction={flops / sustained:.3f} "
            f"of sustained, {flops / peak:.3f} of peak"
        )
        return flops / sustained

    line(
        "reference",
        t_ref,
        f"PE+ME, one example at a time, full-sequence logits, per-token softmax -> NumPy, "
        f"{K} passes in eval mode (identical)",
    )
    fraction = line(
        "ours",
        t_ours,
        f"{'+'.join(m.upper() for m in measures)}, length-sorted batches of <= "
        f"{args.max_tokens_per_batch or 'default'} tokens, LM head at answer positions only, "
        f"{args.dtype}, "
        + (
            f"{K} MC-dropout passes (LoRA dropout {args.lora_dropout} sampling)"
            if K > 1
            else "1 deterministic pass (eval mode)"
        ),
    )
    if K > 1:
        spread = np.abs(ours.pe_passes - ours.pe[:, None]).max()
        print(f"  ours: passes differ (max |PE pass - mean| = {spread:.3g} nats)")
    # correctness: our deterministic scores against the reference's (eval mode) values, and both
    # against float64 (the reference's float32 softmax sums 49k terms one after another)
    check = score_examples(model, tok, task, examples, measures=("pe", "me"), progress=False)
    print(
        "agreement (ours K=1 vs reference): max rel diff "
        f"PE {np.max(np.abs(check.pe / ref_pe[:, 0] - 1)):.2e} "
        f"ME {np.max(np.abs(check.me / ref_me[:, 0] - 1)):.2e}"
    )
    if args.float64_check:
        n = args.float64_check
        pe64, me64 = float64_scores(model, tok, task, examples[:n])
        print(
            f"against float64 on {n} items: max rel diff ours PE {np.max(np.abs(check.pe[:n] / pe64 - 1)):.2e} "
            f"ME {np.max(np.abs(check.me[:n] / me64 - 1)):.2e}, reference PE "
            f"{np.max(np.abs(ref_pe[:n, 0] / pe64 - 1)):.2e} ME {np.max(np.abs(ref_me[:n, 0] / me64 - 1)):.2e}"
        )
    speedup = float(np.median(np.array(t_ref) / np.array(t_ours)))
    last = f"ours_vs_reference={speedup:.2f} roofline_fraction={fraction:.3f}"
    if args.dtype != "float32":
        items = load_examples(args.data, task, limit=args.rank_items) if args.rank_items \
            else examples
        rho, overlap = rank_agreement(model, tok, task, items, measures, K, args)
        print(f"bf16 vs fp32 ranking on {len(items)} items (PE, mean of {K} passes, same "
              f"masks): spearman {rho:.4f}, top-25% overlap {overlap:.3f}")
        last += f" spearman_vs_fp32={rho:.4f} top25_overlap={overlap:.3f}"
    print(last)


def rank_agreement(model, tok, task, items, measures, K, args) -> tuple[float, float]:
    """Spearman's rho between the PE of `items` scored in `args.dtype` and in fp32 (same seed,
    so the same MC masks), and the overlap of the two top-25% sets (fraction of its size)."""
    kw = dict(measures=measures, mc_passes=K, max_tokens_per_batch=args.max_tokens_per_batch,
              seed=0, progress=True)
    low = score_examples(model, tok, task, items, dtype=args.dtype, desc=args.dtype, **kw).pe
    high = score_examples(model, tok, task, items, dtype="float32", desc="float32", **kw).pe
    ranks = [np.argsort(np.argsort(v)) for v in (low, high)]
    rho = float(np.corrcoef(*ranks)[0, 1])
    top = max(1, len(items) // 4)
    sets = [set(np.argsort(-v)[:top].tolist()) for v in (low, high)]
    return rho, len(sets[0] & sets[1]) / top


if __name__ == "__main__":
    main()
