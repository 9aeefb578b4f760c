"""A finished run's last evaluation again, at other generation batch sizes: same answers, how fast?

    OMP_NUM_THREADS=1 python benchmarks/eval_batch.py RUN_DIR [RUN_DIR ...] [--batch-sizes 32,64]

For each run (finished, with its last round's adapter kept: ``output.keep_adapters: last``),
loads the base model and that adapter as the run did, rebuilds the test set from the run's
``config.yaml`` (`starlora.run.data`), and evaluates it (`starlora.evaluation.evaluate`, the
run's evaluation settings) once per batch size in `--batch-sizes` (rows per generation batch,
``evaluation.batch_size``), timing each. Prints per run and size the seconds and how many test
answers are the ones the run itself recorded in ``rounds/<last>/predictions.jsonl``
(generated text) and how many are judged the same way.

Study 2 (results/study-2/protocol-draft.md) asks this before it moves the study's
``evaluation.batch_size`` from 32 to 64: a faster evaluation must not change the answers.
Last line: ``<size>_vs_<first size>=<time ratio, first / size> ...`` per size, then
``same_answers=<n>/<N> same_correct=<n>/<N>``: over all runs, the answers every size gives
identical to the run's own.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from starlora.adapters import load_adapter
from starlora.evaluation import evaluate
from starlora.io import read_jsonl
from starlora.models import load_model
from starlora.run.data import load_data, make_task
from starlora.run.store import RunStore
from starlora.run.uncertainty import last_round


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--batch-sizes", default="32,64")
    args = ap.parse_args()
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    seconds = {b: 0.0 for b in sizes}
    same = correct = total = 0
    for run_dir in args.runs:
        store = RunStore.open(run_dir)
        cfg, k = store.config, last_round(store)
        task = make_task(cfg.task)
        test = load_data(cfg.task, task).test
        recorded = {str(p["id"]): p for p in
                    read_jsonl(store.paths.round_file(k, "predictions.jsonl"))}
        loaded = load_model(cfg.model.name, device=cfg.model.device, dtype=cfg.model.dtype)
        model = load_adapter(loaded.model, store.adapter_dir(k))
        answers = {}
        for b in sizes:
            ev = cfg.evaluation.model_copy(update={"batch_size": b})
            t = time.perf_counter()
            result = evaluate(model, loaded.tokenizer, task, test, ev, progress=False,
                              max_length=cfg.training.max_length, seed=cfg.seed)
            seconds[b] += (took := time.perf_counter() - t)
            answers[b] = {str(p["id"]): p for p in result.predictions}
            n = sum(answers[b][i]["generated"] == recorded[i]["generated"] for i in recorded)
            print(f"{run_dir} round {k}, batch size {b}: {took:.1f} s, accuracy "
                  f"{result.accuracy:.4f}, {n}/{len(recorded)} answers as recorded", flush=True)
        total += len(recorded)
        same += sum(all(answers[b][i]["generated"] == recorded[i]["generated"] for b in sizes)
                    for i in recorded)
        correct += sum(all(answers[b][i]["correct"] == recorded[i]["correct"] for b in sizes)
                       for i in recorded)
    ratios = " ".join(f"{b}_vs_{sizes[0]}={seconds[sizes[0]] / seconds[b]:.2f}"
                      for b in sizes[1:])
    print(f"{ratios} same_answers={same}/{total} same_correct={correct}/{total}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
