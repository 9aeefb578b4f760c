"""Answer-span ECE against whole-sequence ECE in generate mode.

Evaluates a model (SmolLM2-135M-Instruct by default) greedily on the first ``--n`` test items
of gsm8k (``../shared/data/gsm8k/test.jsonl``) or of the synthetic arith task, and prints
accuracy, the ECE of the final answer's probability (``ece_span``, what `EvalResult.ece` now
is) and of the whole generated sequence's probability (``ece_sequence``), with the mean of
each confidence. With ``--shots K`` the prompt starts with the first K train items worked out
in the task's format; the model then tends to go on with a new "Question:", so only the text
before it is graded (the spans still index the full generation).

    python benchmarks/ece_span.py --task gsm8k --n 50 --prompt-style chat --threads 2

The last line reads ``accuracy=... ece_span=... ece_sequence=...``. The figures, with their
commands, machine and date, are in docs/benchmarks.md ("Calibration of generated answers"):
the sequence ECE came out equal to the accuracy (every sequence confidence is about 0), and
the span ECE showed the model overconfident in its final answers.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from shared_data import DATA as SHARED_DATA  # noqa: E402  (benchmarks/shared_data.py)

from starlora.config import EvaluationConfig  # noqa: E402
from starlora.datafiles import load_examples  # noqa: E402
from starlora.evaluation import evaluate  # noqa: E402
from starlora.models import load_model  # noqa: E402
from starlora.tasks import GSM8K, ArithTask, Example, get_task  # noqa: E402

DATA = SHARED_DATA / "gsm8k"


class _FirstAnswer:
    """Grade only the text before the model starts a question of its own (few-shot runs)."""

    def _answer(self, text: str) -> tuple[str, int, int] | None:
        cut = text.find("\nQuestion:")
        return super()._answer(text if cut < 0 else text[:cut])  # type: ignore[misc]


def _examples(task_name: str, split: str, n: int) -> list[Example]:
    if task_name == "arith":
        return ArithTask().generate(split, n, 0)
    return load_examples(DATA / f"{split}.jsonl", GSM8K(), limit=n)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--task", choices=["gsm8k", "arith"], default="gsm8k")
    ap.add_argument("--n", type=int, default=50, help="first N test items")
    ap.add_argument("--prompt-style", choices=["plain", "chat"], default="plain")
    ap.add_argument("--shots", type=int, default=0, help="worked train items before the question")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=None, help="write predictions here as JSON")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    template = None
    if args.shots:
        shots = _examples(args.task, "train", args.shots)
        worked = "".join(f"Question: {ex.question}\nAnswer: {ex.answer}\n\n" for ex in shots)
        template = worked.replace("{", "{{").replace("}", "}}") + "Question: {question}\nAnswer:"
        base = type(get_task(args.task))
        task = type(f"FewShot{base.__name__}", (_FirstAnswer, base), {})(
            prompt_style=args.prompt_style, template=template
        )
    else:
        task = get_task(args.task, prompt_style=args.prompt_style)
    examples = _examples(args.task, "test", args.n)
    loaded = load_model(args.model, device="cpu", dtype="float32")
    config = EvaluationConfig(
        mode="generate", max_new_tokens=args.max_new_tokens, batch_size=args.batch_size
    )
    t0 = time.perf_counter()
    result = evaluate(loaded.model, loaded.tokenizer, task, examples, config)
    seconds = time.perf_counter() - t0

    preds = result.predictions
    span = np.array([p["confidence"] for p in preds])
    sequence = np.array([p["sequence_confidence"] for p in preds])
    found = np.array([p["prediction"] is not None for p in preds])
    correct = np.array([p["correct"] for p in preds])
    tokens = [p["answer_tokens"] for p in preds if p["answer_tokens"]]
    print(f"model={args.model} task={args.task} n={len(preds)} prompt_style={args.prompt_style} "
          f"shots={args.shots} max_new_tokens={args.max_new_tokens} seconds={seconds:.0f}")
    print(f"answer found in {found.mean():.2f} of generations; answer tokens per found answer "
          f"{np.mean(tokens) if tokens else 0:.2f}")
    if found.any():
        print(f"mean span confidence where an answer was found {span[found].mean():.4f} "
              f"(correct {span[found & correct].mean() if (found & correct).any() else np.nan:.4f}, "
              f"wrong {span[found & ~correct].mean() if (found & ~correct).any() else np.nan:.4f})")
    print(f"mean_span_confidence={span.mean():.4g} mean_sequence_confidence={sequence.mean():.4g}")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                        "predictions": preds}, indent=1))
    print(f"accuracy={result.accuracy:.4f} ece_span={result.ece:.4f} "
          f"ece_sequence={result.ece_sequence:.4f}")


if __name__ == "__main__":
    main()
