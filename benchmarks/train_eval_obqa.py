"""Zero-shot vs trained LoRA (with and without the constraint terms) on OpenBookQA.

Evaluates the model zero-shot on the first ``--test-n`` test items (choice scoring), then
trains on the first ``--train-n`` train items, once with the constraint terms (decoupled
decay ``--b-decay`` on B, LoRA dropout ``--dropout``) and once without (no decay, dropout 0),
evaluating each adapter on the same test items. Prints one line per run and writes JSON.

    python benchmarks/train_eval_obqa.py --train-n 400 --test-n 200 --epochs 3 --threads 1

On a busy CPU, ``--threads 1`` is often faster than more threads (no oversubscription).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from shared_data import DATA as SHARED_DATA  # noqa: E402  (benchmarks/shared_data.py)

from starlora.adapters import remove_adapter  # noqa: E402
from starlora.config import EvaluationConfig, LoraConfig, TrainingConfig  # noqa: E402
from starlora.datafiles import load_examples  # noqa: E402
from starlora.evaluation import evaluate  # noqa: E402
from starlora.models import load_model  # noqa: E402
from starlora.tasks import get_task  # noqa: E402
from starlora.training import train_adapter  # noqa: E402

DATA = SHARED_DATA / "obqa"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", type=Path, default=DATA, help="has train.jsonl, test.jsonl")
    ap.add_argument("--train-n", type=int, default=400, help="first N train items")
    ap.add_argument("--test-n", type=int, default=200, help="first N test items")
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--lr", type=float, default=1.5e-4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--dropout", type=float, default=0.1, help="LoRA dropout of the constraint run")
    ap.add_argument("--b-decay", type=float, default=0.5, help="B decay of the constraint run")
    ap.add_argument("--prompt-style", choices=["plain", "chat"], default="plain")
    ap.add_argument("--runs", default="zero-shot,no-constraint,constraint")
    ap.add_argument("--mixed-precision", default="no", choices=["auto", "no", "bf16"])
    ap.add_argument("--eval-batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=None, help="write results here as JSON")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    task = get_task("obqa", prompt_style=args.prompt_style)
    train = load_examples(args.data / "train.jsonl", task, limit=args.train_n)
    test = load_examples(args.data / "test.jsonl", task, limit=args.test_n)
    loaded = load_model(args.model, device="auto", dtype="auto")
    evaluation = EvaluationConfig(mode="choice", batch_size=args.eval_batch_size)
    runs = {
        "no-constraint": (dict(b_decay_mode="none"), dict(dropout=0.0)),
        "constraint": (
            dict(b_decay_mode="decoupled", b_decay=args.b_decay), dict(dropout=args.dropout)
        ),
    }

    def run_eval(model) -> dict:
        start = time.perf_counter()
        result = evaluate(model, loaded.tokenizer, task, test, evaluation)
        return {"accuracy": result.accuracy, "ece": result.ece, "n": result.n,
                "eval_seconds": time.perf_counter() - start}

    results = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": {}}
    model = loaded.model
    for name in args.runs.split(","):
        if name == "zero-shot":
            row = run_eval(model)
        else:
            train_kw, lora_kw = runs[name]
            training = TrainingConfig(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                                      mixed_precision=args.mixed_precision, **train_kw)
            lora = LoraConfig(r=args.r, alpha=args.alpha, **lora_kw)
            trained = train_adapter(model, loaded.tokenizer, task, train, training, lora,
                                    seed=args.seed)
            row = run_eval(trained.model)
            row.update(train_seconds=trained.seconds, steps=trained.steps,
                       train_tokens=trained.train_tokens, final_loss=trained.final_loss,
                       first_loss=trained.losses[0])
            model = remove_adapter(trained.model)
        results["runs"][name] = row
        print(f"{name:>14}: acc {row['accuracy']:.3f}  ece {row['ece']:.3f}  "
              + "  ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("accuracy", "ece")),
              flush=True)
    if args.out:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2))
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
