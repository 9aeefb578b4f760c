"""Training throughput: the STAR authors' style of LoRA training against `train_adapter`, in one run.

Both sides train a fresh LoRA adapter (same seed, same init, r / alpha / dropout, AdamW with
decay on B only, linear schedule, gradient clipping, lr, batch size, epochs) on the same items,
each encoded the same way (`encode_example`, cut to `--max-length` tokens from the left) with
labels on the answer tokens only:

* reference: the authors' style: every sequence padded to `--max-length` tokens, fp32, batches
  in random order, ``model(**batch, labels=...)``, which makes logits over the whole vocabulary
  at every position of every sequence;
* ours: `starlora.training.train_adapter`: length-grouped batches, LM head on answer positions
  only (`starlora.answer_loss.AnswerLoss`), ``--mixed-precision`` (auto: bf16 where the
  hardware computes it natively, see `resolve_mixed_precision`), on base weights in ``--dtype``
  (float32 by default; ``auto`` is what a run loads, ``model.dtype: auto``: bf16 on GPUs).

Both see the same real (non-padding) tokens, so tokens/s counts those for both and the speed-up
is the ratio of wall times on the same work. Wall time is the whole training call (adapter
attached, data encoded, loop, adapter back); the loop alone is shown too. The final loss is the
loss of the whole training set after training, evaluated identically for both sides (fp32, eval
mode, no dropout, `score_examples`; with ``--dtype`` other than fp32, ours' in its weights'
dtype): the sum of the answer tokens' negative log-likelihoods over their number. With `--repeats` > 1 the sides alternate (reference first on odd repeats) and the
medians are reported. The last line reads ``ours_vs_reference=<ratio> loss_rel_diff=<x>``.

    python benchmarks/training.py                       # 200 GSM8K items, SmolLM2-135M, 1 epoch
    python benchmarks/training.py --model tiny-llama --limit 16 --max-length 96   # smoke
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from shared_data import DATA as SHARED_DATA  # noqa: E402  (benchmarks/shared_data.py)

from starlora.adapters import attach_lora, remove_adapter  # noqa: E402
from starlora.config import LoraConfig, TrainingConfig  # noqa: E402
from starlora.datafiles import load_examples  # noqa: E402
from starlora.models import load_model, pick_device, pick_dtype, tune_cpu_allocator  # noqa: E402
from starlora.scoring import score_examples  # noqa: E402
from starlora.tasks import get_task  # noqa: E402
from starlora.train_batches import length_grouped_batches, padding_fraction  # noqa: E402
from starlora.training import (  # noqa: E402
    build_optimizer,
    collate,
    encode_example,
    train_adapter,
)


def reference_train(model, tokenizer, task, examples, training: TrainingConfig, lora: LoraConfig,
                    seed: int, pad_to: int):
    """The authors' style of training loop. Returns (peft model, loop seconds, real tokens,
    per-step losses)."""
    from transformers import get_scheduler, set_seed

    set_seed(seed)
    peft = attach_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, init=lora.init)
    data = [encode_example(task, tokenizer, ex, training.max_length) for ex in examples]

    def pad(pairs):
        batch = collate(pairs, tokenizer.pad_token_id)
        width = pad_to - batch["input_ids"].shape[1]
        fill = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0, "labels": -100}
        return {k: torch.nn.functional.pad(v, (0, width), value=fill[k]) for k, v in batch.items()}

    loader = torch.utils.data.DataLoader(
        data, batch_size=training.batch_size, shuffle=True, collate_fn=pad,
        generator=torch.Generator().manual_seed(seed),
    )
    optimizer = build_optimizer(peft, training)
    steps = max(1, math.ceil(len(loader) * training.epochs))
    scheduler = get_scheduler(training.scheduler, optimizer, num_warmup_steps=0,
                              num_training_steps=steps)
    device = next(peft.parameters()).device
    trainable = [p for p in peft.parameters() if p.requires_grad]
    losses, tokens = [], 0
    peft.train()
    start = time.perf_counter()
    while len(losses) < steps:
        for batch in loader:
            if len(losses) >= steps:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = peft(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, training.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            tokens += int(batch["attention_mask"].sum())
    seconds = time.perf_counter() - start
    return peft.eval(), seconds, tokens, losses


def set_loss(model, tokenizer, task, examples, max_length: int) -> float:
    """Mean answer-token NLL (nats) of `examples` under `model`: fp32, eval mode, no dropout."""
    scores = score_examples(model, tokenizer, task, examples, measures=("pe",), mc_passes=1,
                            max_length=max_length, progress=False)
    return float(scores.pe.sum() / scores.n_answer_tokens.sum())


def profile_side(name: str, fn, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    print(f"--- profile: {name} (top ops by self CPU time)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--task", default="gsm8k")
    ap.add_argument("--data", default=str(SHARED_DATA / "gsm8k" / "train.jsonl"))
    ap.add_argument("--limit", type=int, default=200, help="training items")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-length", type=int, default=384,
                    help="tokens per sequence: both sides cut to it, the reference pads to it")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=TrainingConfig().lr)
    ap.add_argument("--lora-r", type=int, default=64)
    ap.add_argument("--lora-alpha", type=float, default=16)
    ap.add_argument("--lora-dropout", type=float, default=0.1)
    ap.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16", "fp16"],
                    help="ours only; the reference is fp32")
    ap.add_argument("--dtype", default="float32", choices=["float32", "auto", "bfloat16"],
                    help="ours only: the base weights' dtype (auto = what a run loads, "
                         "model.dtype auto: bf16 on GPUs, fp32 on CPUs); the reference is fp32. "
                         "Not fp32: ours trains a second copy, and its final loss is evaluated "
                         "in that dtype")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1, help="alternations of the two sides")
    ap.add_argument("--profile", type=int, default=0,
                    help="afterwards, profile N steps of each side and print the top ops")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's); on a CPU shared with other busy "
                         "processes, 1 avoids OpenMP threads waiting on each other")
    ap.add_argument("--default-allocator", action="store_true",
                    help="skip tune_cpu_allocator() (the CLI applies it)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator = "default"
    if args.device == "cpu" and not args.default_allocator and tune_cpu_allocator():
        allocator = "tuned"  # as the CLI does; both sides run in this process

    loaded = load_model(args.model, device=args.device, dtype="float32")
    model, tok = loaded.model, loaded.tokenizer
    ours_model = model
    if pick_dtype(args.dtype, pick_device(args.device)) != torch.float32:
        ours_model = load_model(args.model, device=args.device, dtype=args.dtype).model
    task = get_task(args.task)
    examples = load_examples(args.data, task, limit=args.limit)
    training = TrainingConfig(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                              max_length=args.max_length, mixed_precision=args.mixed_precision)
    lora = LoraConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout)
    lengths = [sum(map(len, encode_example(task, tok, ex, args.max_length))) for ex in examples]
    answers = [len(encode_example(task, tok, ex, args.max_length)[1]) for ex in examples]
    n_batches = math.ceil(len(examples) / args.batch_size)
    random_batches = [list(range(i, min(i + args.batch_size, len(examples))))
                      for i in range(0, len(examples), args.batch_size)]  # data order is random
    print(
        f"device={args.device} threads={torch.get_num_threads()} model={args.model} "
        f"params={sum(p.numel() for p in model.parameters()) / 1e6:.1f}M task={args.task} "
        f"items={len(examples)} real_tokens/epoch={sum(lengths)} answer_tokens/epoch={sum(answers)} "
        f"longest={max(lengths)} batch={args.batch_size} batches/epoch={n_batches} "
        f"epochs={args.epochs} lr={args.lr} lora=r{args.lora_r}/alpha{args.lora_alpha:g}/"
        f"dropout{args.lora_dropout} malloc={allocator} ours_weights="
        f"{next(ours_model.parameters()).dtype}"
    )
    ours_batches = length_grouped_batches(lengths, args.batch_size, args.seed)
    print(
        f"padding (share of tokens fed that are padding): reference (pad to {args.max_length}) "
        f"{1 - sum(lengths) / (len(lengths) * args.max_length):.3f}; random batches padded to "
        f"their longest {padding_fraction(lengths, random_batches):.3f}; ours (length-grouped, "
        f"epoch 0) {padding_fraction(lengths, ours_batches):.4f}"
    )
    base_loss = set_loss(model, tok, task, examples, args.max_length)
    print(f"whole-set answer-token loss before training: {base_loss:.4f}")

    def run_reference(model):
        t = time.perf_counter()
        peft, loop_s, tokens, losses = reference_train(model, tok, task, examples, training, lora,
                                                       args.seed, args.max_length)
        wall = time.perf_counter() - t
        loss = set_loss(peft, tok, task, examples, args.max_length)
        return remove_adapter(peft), dict(wall=wall, loop=loop_s, tokens=tokens, steps=len(losses),
                                          loss=loss, last=losses[-10:], precision="no")

    def run_ours(model):
        t = time.perf_counter()
        result = train_adapter(model, tok, task, examples, training, lora, seed=args.seed,
                               progress=False)
        wall = time.perf_counter() - t
        loss = set_loss(result.model, tok, task, examples, args.max_length)
        return remove_adapter(result.model), dict(
            wall=wall, loop=result.seconds, tokens=result.train_tokens, steps=result.steps,
            loss=loss, last=result.losses[-10:], precision=result.mixed_precision)

    # warm-up: one short step of each side (kernels, allocator)
    few = sorted(examples, key=lambda ex: len(ex.question))[: args.batch_size]
    warm = training.model_copy(update={"epochs": 1})
    shared = ours_model is model  # ours trains the reference's (fp32) model
    model = remove_adapter(reference_train(model, tok, task, few, warm, lora, 0, args.max_length)[0])
    ours_model = model if shared else ours_model
    ours_model = remove_adapter(train_adapter(ours_model, tok, task, few, warm, lora, seed=0,
                                              progress=False).model)
    models = {"reference": model, "ours": ours_model}

    runs: dict[str, list[dict]] = {"reference": [], "ours": []}
    for k in range(args.repeats):
        order = ["reference", "ours"] if k % 2 == 0 else ["ours", "reference"]
        for side in order:
            base, stats = (run_reference if side == "reference" else run_ours)(models[side])
            models = {name: base if m is models[side] else m for name, m in models.items()}
            runs[side].append(stats)
            print(f"  repeat {k + 1} {side}: wall {stats['wall']:.1f}s loop {stats['loop']:.1f}s "
                  f"loss {stats['loss']:.4f}", flush=True)

    def summary(side: str, what: str) -> dict:
        rs = runs[side]
        wall = statistics.median(r["wall"] for r in rs)
        loop = statistics.median(r["loop"] for r in rs)
        last = rs[-1]
        mean_last = sum(last["last"]) / len(last["last"])
        print(
            f"{side}: {what}\n  {side}: wall {wall:.1f}s (loop {loop:.1f}s; median of "
            f"{len(rs)}) steps={last['steps']} real_tokens={last['tokens']} "
            f"tokens/s={last['tokens'] / wall:.1f} (loop {last['tokens'] / loop:.1f}) "
            f"precision={last['precision']} final whole-set loss={last['loss']:.4f} "
            f"(train loss, mean of last {len(last['last'])} steps: {mean_last:.4f})"
        )
        return dict(wall=wall, loss=last["loss"], tokens=last["tokens"])

    ref = summary("reference", f"pad to {args.max_length}, fp32, full-vocabulary logits at "
                               "every position (model(**batch, labels=...))")
    ours = summary("ours", "length-grouped batches, LM head on answer positions only, "
                           f"mixed_precision={args.mixed_precision}")
    if ref["tokens"] != ours["tokens"]:
        print(f"WARNING: the sides saw different real tokens ({ref['tokens']} vs {ours['tokens']})")
    ratio = ref["wall"] / ours["wall"]
    loss_rel = abs(ours["loss"] - ref["loss"]) / ref["loss"]

    if args.profile:
        part = examples[: args.profile * args.batch_size]
        short = training.model_copy(update={"epochs": 1})
        profile_side("reference", lambda: remove_adapter(
            reference_train(models["reference"], tok, task, part, short, lora, 0,
                            args.max_length)[0]), 20)
        profile_side("ours", lambda: remove_adapter(
            train_adapter(models["ours"], tok, task, part, short, lora, seed=0,
                          progress=False).model), 20)
    print(f"ours_vs_reference={ratio:.2f} loss_rel_diff={loss_rel:.4f}")


if __name__ == "__main__":
    main()
