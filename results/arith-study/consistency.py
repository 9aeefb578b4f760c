"""Exploratory (not in the protocol's family; issue 34): the self-consistency signal of the arith
study's last adapters, which the committed runs could not give (they are committed without
adapters), and the constraint ablation on it.

    # per run: retrain, evaluate with K samples, cache (skips runs already cached); one
    # process per arm (about 13 CPU-minutes a run with --items 100 on a shared machine)
    for arm in pe-dynamic pe-dynamic-no-constraints; do
        OMP_NUM_THREADS=1 python results/arith-study/consistency.py run \
            results/arith-study/runs/$arm/seed{0..9} --samples 5 --items 100 &
    done
    # the table, from the cache alone
    python results/arith-study/consistency.py report > \
        results/arith-study/exploratory/consistency.md

**Rerun** (`retrain`, `evaluate_sampled`), per run, with the public functions a run itself
calls: the run's ``config.yaml`` rebuilds task, pool and test split (`starlora.run.data`); the
LAST round k's adapter is trained again (`starlora.training.train_adapter`) on the rows of the
committed ``labelled.jsonl`` with ``round <= k``, in file order, from the base model, with the
round's own training stream (``phase_seed(seed, k, "train")``, `starlora.run.protocol`); then
`starlora.evaluation.evaluate` answers all test items greedily, as the run did, and, on the
first N test items (``--items``; all by default), a second call samples K answers per item
at temperature 1 (``evaluation.samples: K``, seeded per item from ``phase_seed(seed, k,
"evaluate")`` and its id, so an item's samples do not depend on N). ``consistency`` is the
share of the K sampled answers whose extracted answer equals that call's greedy one
(``sampled_with``, the same answer as the first call's but for rounding, since its batches
hold fewer items). The test set is generated from a seed, so its first N items are a
random sample of it.

**Faithfulness.** The greedy answers of the retrained adapter on all test items are compared
with the committed ``rounds/<k>/predictions.jsonl``: the share of identical extracted answers
and of identical generated texts, and the accuracy of each. The study trained in bf16
autocast on an AMD Zen 4 (avx512_bf16) with the code of 1bc3d70; a rerun on another CPU, or
with later code, need not round the same way, and one flipped token of a greedy chain changes
the rest of it. It does not here: on the 2-core Intel Xeon (AMX, avx512_bf16) of 2026-12-04,
pe-dynamic/seed0's retrained adapter ends training at loss 0.0666 (committed 0.0878) and gives
the committed answer on 214 of 300 items (accuracy 0.543, committed 0.560). The code is not
the cause: 1bc3d70's own loop, resumed on a copy of that run at round 6 on the same machine
(``starlora run`` with rounds/6 and its metrics line removed, state set to round 6), gives the
same final loss to the last digit and the same 300 answers and log-probabilities, bit for
bit, as this script with today's code. What differs is the machine (the study's AMD Zen 4
against this Intel CPU: bf16 autocast matmuls take other kernels and round otherwise) or a
library build the study had (torch was 2.13.0 then and now). So the retrained adapters are
new draws of the same procedure (same labels, seed, config and code), not the study's
adapters. Every signal is measured on the retrained adapter's own answers and their
correctness, which is what a run with ``evaluation.samples`` would have recorded.

**Cache** (`CACHE`, committed): one JSON Lines file per run, ``<arm>-seed<s>.jsonl``, written
atomically when the run is done, so an interrupted ``run`` redoes only the run it was in: a
header (the run, the round, K, N, the training's steps and final loss next to the committed
ones, the seconds, torch) and one row per test item (``id``, ``prediction``, ``correct``,
``logprob``, ``tokens``, the committed ``committed_prediction`` and ``committed_correct``,
``same_text``; on the sampled items ``consistency``, ``sampled_with`` and
``sampled_correct``). ``report`` reads only these.

**Report.** Per arm (mean ± sample std over seeds), on the sampled items, the consistency
signal's AUROC for a correct
answer (``roc-auc``), AURC (``rcc-auc``), Brier, equal-width and equal-mass ECE (15 bins)
(`starlora.confidence.signal_metrics`), with the retrained adapters' ``msp`` and
``perplexity`` beside it for reference; and the constraint ablation,
``pe-dynamic-no-constraints`` minus ``pe-dynamic`` paired by seed, on each of them: mean
difference, 95% percentile bootstrap over seeds (2,000 resamples, NumPy seed 0) and the exact
two-sided sign-flip p (`starlora.study.stats`), exploratory and uncorrected.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = HERE / "exploratory" / "consistency"
ARMS = ("pe-dynamic", "pe-dynamic-no-constraints")
SIGNALS = ("consistency", "msp", "perplexity")
QUANTITIES = ("roc-auc", "rcc-auc", "brier", "ece", "ece-adaptive")
ECE_BINS = 15
SEEDS = range(10)


def cache_path(run_dir: Path, cache: Path = CACHE) -> Path:
    """``<cache>/<arm>-seed<s>.jsonl`` for ``runs/<arm>/seed<s>``."""
    run_dir = Path(run_dir)
    return cache / f"{run_dir.parent.name}-{run_dir.name}.jsonl"


def last_round(run_dir: Path) -> int:
    from starlora.io import read_jsonl

    return max(r["round"] for r in read_jsonl(Path(run_dir) / "metrics.jsonl"))


def retrain(run_dir: Path, loaded: Any = None, *, progress: bool = False) -> dict[str, Any]:
    """The last round's adapter of `run_dir`, trained again (module doc). Returns ``model``
    (the peft model, eval mode), ``tokenizer``, ``task``, ``config``, ``round``, ``test``
    (the test examples in the committed predictions' order), ``committed`` (those
    predictions), ``train`` (steps, final loss, seconds). `loaded`: the base model
    (`starlora.models.Loaded`) to reuse; by default the run's model is loaded."""
    from starlora.errors import StarloraError
    from starlora.io import read_jsonl
    from starlora.models import load_model
    from starlora.run.data import load_data, make_task, set_aside_stop_set
    from starlora.run.protocol import phase_seed
    from starlora.run.store import RunStore
    from starlora.tasks import Example
    from starlora.training import train_adapter

    store = RunStore.open(run_dir)
    cfg = store.config
    k = last_round(run_dir)
    task = make_task(cfg.task)
    data = set_aside_stop_set(load_data(cfg.task, task), cfg.active_learning.stop_set, cfg.seed)
    by_id = {ex.id: ex for ex in [*data.pool, *data.labelled]}
    committed = read_jsonl(store.paths.round_file(k, "predictions.jsonl"))
    test = {ex.id: ex for ex in data.test}
    if sorted(test) != sorted(str(p["id"]) for p in committed):
        raise StarloraError(f"{run_dir}: the test set rebuilt from config.yaml is not the one "
                            f"round {k} was evaluated on")
    # as `Run.labelled_examples`: the labels of rounds 0..k, in file order
    labelled = [Example(r["id"], by_id[r["id"]].question, r["answer"])
                for r in store.labelled() if r["round"] is None or r["round"] <= k]
    train_json = store.read_round(k, "train.json")
    if len(labelled) != train_json["n_examples"]:
        raise StarloraError(f"{run_dir}: {len(labelled)} labels for round {k}, which trained "
                            f"on {train_json['n_examples']}")
    if loaded is None:
        loaded = load_model(cfg.model.name, device=cfg.model.device, dtype=cfg.model.dtype,
                            trust_remote_code=cfg.model.trust_remote_code)
    result = train_adapter(loaded.model, loaded.tokenizer, task, labelled, cfg.training,
                           cfg.lora, seed=phase_seed(cfg.seed, k, "train"), progress=progress)
    return {"model": result.model, "tokenizer": loaded.tokenizer, "task": task, "config": cfg,
            "round": k, "test": [test[str(p["id"])] for p in committed],
            "committed": committed,
            "train": {"steps": result.steps, "final_loss": result.final_loss,
                      "seconds": round(result.seconds, 1), "precision": result.mixed_precision,
                      "committed_steps": train_json["steps"],
                      "committed_final_loss": train_json["final_loss"]}}


def evaluate_sampled(found: dict[str, Any], samples: int, items: int | None = None,
                     *, progress: bool = False) -> tuple[dict, list[dict]]:
    """Greedy answers of every test item of `found` (`retrain`'s) and `samples` sampled
    answers per item of the first `items` test items (all by default). Returns the cache's
    header and one row per test item; the sampled items' rows have ``consistency``."""
    import torch

    from starlora.evaluation import evaluate
    from starlora.run.protocol import phase_seed

    cfg, k = found["config"], found["round"]
    test, committed = found["test"], found["committed"]
    n = len(test) if items is None else min(items, len(test))

    def run(examples: list, k_samples: int) -> list[dict]:
        return evaluate(found["model"], found["tokenizer"], found["task"], examples,
                        cfg.evaluation.model_copy(update={"samples": k_samples}),
                        progress=progress, seed=phase_seed(cfg.seed, k, "evaluate"),
                        max_length=cfg.training.max_length).predictions

    t0 = time.perf_counter()
    greedy = run(test, samples if n == len(test) else 0)
    sampled = greedy if n == len(test) else run(test[:n], samples)
    seconds = time.perf_counter() - t0
    rows = [{"id": p["id"], "prediction": p["prediction"], "correct": p["correct"],
             "logprob": p["logprob"], "tokens": p["tokens"],
             "committed_prediction": c["prediction"], "committed_correct": c["correct"],
             "same_text": p["generated"] == c["generated"]}
            for p, c in zip(greedy, committed)]
    for r, p in zip(rows, sampled):  # the sampled items: the first n
        # the greedy answer the samples were compared with (the same but for rounding when
        # it came from a second call, on fewer items, in other batches)
        r |= {"consistency": p["consistency"], "sampled_with": p["prediction"],
              "sampled_correct": p["correct"]}
    header = {"header": True, "run": cfg.active_learning.strategy, "seed": cfg.seed,
              "round": k, "samples": samples, "items": n, "test_items": len(rows),
              "train": found["train"], "evaluate_seconds": round(seconds, 1),
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine()}
    return header, rows


def faithfulness(rows: list[dict]) -> dict[str, float]:
    """Share of identical extracted answers and generated texts; retrained and committed
    accuracy, over `rows` (the cache's)."""
    return {"same_answer": float(np.mean([r["prediction"] == r["committed_prediction"]
                                          for r in rows])),
            "same_text": float(np.mean([r["same_text"] for r in rows])),
            "accuracy": float(np.mean([r["correct"] for r in rows])),
            "committed_accuracy": float(np.mean([r["committed_correct"] for r in rows]))}


def signals_of(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per signal (`SIGNALS`), `starlora.confidence.signal_metrics` on the retrained
    adapter's own correctness, over the sampled items (the rows with ``consistency``)."""
    from starlora.confidence import signal_metrics

    rows = [r for r in rows if "consistency" in r]
    correct = np.array([float(r["correct"]) for r in rows])
    own = np.array([float(r.get("sampled_correct", r["correct"])) for r in rows])  # of the answer it judges
    return {"consistency": signal_metrics([r["consistency"] for r in rows], own, ECE_BINS),
            "msp": signal_metrics(np.exp([r["logprob"] for r in rows]), correct, ECE_BINS),
            "perplexity": signal_metrics(np.exp([r["logprob"] / max(r["tokens"], 1)
                                                 for r in rows]), correct, ECE_BINS)}


def read_cache(path: Path) -> tuple[dict, list[dict]]:
    from starlora.io import read_jsonl

    rows = read_jsonl(path)
    return rows[0], rows[1:]


def run_one(run_dir: Path, samples: int, items: int | None, cache: Path = CACHE,
            loaded: Any = None, progress: bool = False) -> Path:
    """Rerun `run_dir` and write its cache file; returns the path."""
    from starlora.adapters import remove_adapter
    from starlora.io import write_jsonl

    found = retrain(run_dir, loaded, progress=progress)
    header, rows = evaluate_sampled(found, samples, items, progress=progress)
    header["run"] = f"{Path(run_dir).parent.name}/{Path(run_dir).name}"
    header["faithfulness"] = faithfulness(rows)
    out = cache_path(run_dir, cache)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(out, [header, *rows])
    if loaded is not None:  # the base model back, for the next run
        loaded.model = remove_adapter(found["model"])
    return out


def fmt(values: list[float]) -> str:
    a = np.asarray(values, dtype=float)
    return f"{a.mean():.3f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.3f}"


def report(cache: Path = CACHE) -> str:
    """The markdown of everything cached (module doc)."""
    from starlora.study.stats import bootstrap_diff_ci, sign_flip_p

    runs: dict[str, dict[int, tuple[dict, list[dict]]]] = {arm: {} for arm in ARMS}
    for path in sorted(cache.glob("*.jsonl")):
        header, rows = read_cache(path)
        arm, seed = header["run"].split("/")
        if arm in runs:
            runs[arm][int(seed[4:])] = (header, rows)
    headers = [h for arm in ARMS for h, _ in runs[arm].values()]
    if len({(h["samples"], h["items"]) for h in headers}) != 1:
        raise SystemExit(f"{cache}: runs with different K or N: "
                         + ", ".join(f"{h['run']} K={h['samples']} N={h['items']}"
                                     for h in headers))
    first = headers[0]
    out = ["# Self-consistency of the arith study's last adapters, retrained (exploratory)\n",
           "Generated by `python results/arith-study/consistency.py report > "
           "results/arith-study/exploratory/consistency.md` from the per-run files in "
           "`exploratory/consistency/`, which `OMP_NUM_THREADS=1 python results/arith-study/"
           "consistency.py run results/arith-study/runs/pe-dynamic/seed{0..9} --samples "
           f"{first['samples']} --items {first['items']}` and the same for "
           "`pe-dynamic-no-constraints` wrote, one process each (see the script's docstring "
           "for every definition). Exploratory "
           "and uncorrected: not part of the study's protocol.\n",
           f"K = {first['samples']} answers sampled at temperature 1 per test item, on the "
           f"first {first['items']} of the {first['test_items']} test items (a fixed random "
           "sample: the test set is generated from a seed); every signal below on those "
           f"items. The last round ({first['round']}, 112 labels) retrained from the "
           "committed labels with the run's own training seed.\n",
           "## Faithfulness: the retrained adapter's greedy answers against the committed "
           "ones\n",
           "All test items. Same answer / same text: the share of items whose extracted answer "
           "/ whole generated text is identical.\n",
           "| run | same answer | same text | accuracy (retrained) | accuracy (committed) "
           "| final loss (retrained) | final loss (committed) | minutes |\n"
           "|---|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        for seed in sorted(runs[arm]):
            h, rows = runs[arm][seed]
            f, t = faithfulness(rows), h["train"]
            out.append(f"| {arm}/seed{seed} | {f['same_answer']:.3f} | {f['same_text']:.3f} | "
                       f"{f['accuracy']:.3f} | {f['committed_accuracy']:.3f} | "
                       f"{t['final_loss']:.4f} | {t['committed_final_loss']:.4f} | "
                       f"{(t.get('seconds', 0) + h.get('evaluate_seconds', 0)) / 60:.0f} |")
    out += [f"\n{h['run']}: {h['note']}." for arm in ARMS for h, _ in runs[arm].values()
            if h.get("note")]
    out.append("\nThe retrained adapters are not the study's: they are new draws of the same "
               "procedure (same labels, seed, config and code). On pe-dynamic/seed0, the code of "
               "the study's commit (1bc3d70), run on this machine, gives the same final loss and "
               "the same answers, bit for bit, as today's code: the difference is the machine "
               "(the script's docstring, Faithfulness).")
    missing = [f"{arm}/seed{s}" for arm in ARMS for s in SEEDS if s not in runs[arm]]
    if missing:
        out.append(f"\n**Not rerun yet** ({len(missing)} of {len(ARMS) * len(SEEDS)} runs): "
                   + ", ".join(missing) + ". The same `run` command resumes them; the tables "
                   "below hold the runs done, and the paired test the seeds done in both "
                   "arms.")
    numbers = {arm: {s: signals_of(rows) for s, (_, rows) in runs[arm].items()} for arm in ARMS}
    out += ["\n## Per arm: each signal of the retrained adapters\n",
            "Mean ± sample std over seeds, on the retrained adapter's own answers. roc-auc: "
            "higher is better; rcc-auc (AURC), brier, ece (equal-width), ece-adaptive "
            "(equal-mass), 15 bins: lower is better.\n",
            "| arm | n | signal | accuracy (these items) | " + " | ".join(QUANTITIES) + " |\n|"
            + "---|" * (4 + len(QUANTITIES))]
    for arm in ARMS:
        seeds = sorted(numbers[arm])
        if not seeds:
            continue
        acc = fmt([np.mean([r["correct"] for r in runs[arm][s][1] if "consistency" in r])
                   for s in seeds])  # on the sampled items
        for sig in SIGNALS:
            cells = [fmt([numbers[arm][s][sig][q] for s in seeds]) for q in QUANTITIES]
            out.append(f"| {arm} | {len(seeds)} | {sig} | {acc} | " + " | ".join(cells) + " |")
    a, b = ARMS[1], ARMS[0]
    seeds = sorted(set(numbers[a]) & set(numbers[b]))
    out += [f"\n## Constraint ablation: {a} minus {b} (exploratory, uncorrected)\n",
            f"Paired by seed ({len(seeds)} seeds); 95% CI: percentile bootstrap over seeds "
            "(2,000 resamples, NumPy seed 0); p: exact two-sided sign-flip test "
            "(`starlora.study.stats`). For rcc-auc, brier and the ECEs, negative = the "
            "ablation is better; for roc-auc, positive.\n",
            "| signal | quantity | mean diff | std | 95% CI | p |\n|---|---|---|---|---|---|"]
    for sig in SIGNALS if seeds else ():
        for q in QUANTITIES:
            d = np.array([numbers[a][s][sig][q] - numbers[b][s][sig][q] for s in seeds])
            if len(seeds) < 2:  # one pair: its difference, no test
                out.append(f"| {sig} | {q} | {d.mean():+.4f} | n/a | n/a | n/a |")
                continue
            lo, hi = bootstrap_diff_ci(d)
            out.append(f"| {sig} | {q} | {d.mean():+.4f} | {d.std(ddof=1):.4f} | "
                       f"[{lo:+.4f}, {hi:+.4f}] | {sign_flip_p(d):.4f} |")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="rerun runs and cache them (skips cached runs)")
    r.add_argument("runs", nargs="+", type=Path, help="run directories runs/<arm>/seed<s>")
    r.add_argument("--samples", type=int, default=5, help="K (default 5)")
    r.add_argument("--items", type=int, default=None, help="the first N test items only")
    r.add_argument("--cache", type=Path, default=CACHE)
    p = sub.add_parser("report", help="the markdown table, from the cache")
    p.add_argument("--cache", type=Path, default=CACHE)
    args = ap.parse_args()
    if args.command == "report":
        sys.stdout.write(report(args.cache))
        return 0
    from starlora.models import load_model
    from starlora.run.store import RunStore

    loaded = None
    for run_dir in args.runs:
        out = cache_path(run_dir, args.cache)
        if out.is_file():
            print(f"{run_dir}: cached in {out}", file=sys.stderr)
            continue
        if loaded is None:
            cfg = RunStore.open(run_dir).config
            loaded = load_model(cfg.model.name, device=cfg.model.device, dtype=cfg.model.dtype,
                                trust_remote_code=cfg.model.trust_remote_code)
        t0 = time.perf_counter()
        run_one(run_dir, args.samples, args.items, args.cache, loaded, progress=True)
        header, _ = read_cache(out)
        print(f"{run_dir}: {time.perf_counter() - t0:.0f} s, {json.dumps(header)}",
              file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
