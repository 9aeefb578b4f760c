"""Exploratory (not in the protocol's family): which confidence signal tells a right answer from
a wrong one, does the constraint change it, and when would a label-free rule have stopped?

    python results/arith-study/calibration.py results/arith-study/runs > \
        results/arith-study/exploratory/calibration.md

**Signals** (`starlora.evaluation.prediction_signals`, recomputed from the committed
``rounds/<last>/predictions.jsonl`` of every run; nothing is rerun):

* ``answer``: the answer-span probability, the confidence the runs' ECE used;
* ``msp``: the sequence probability, ``exp(logprob)`` of the whole generated answer;
* ``perplexity``: ``exp(logprob / tokens)``, the geometric-mean token probability. The committed
  predictions predate the ``tokens`` field, so the count is re-derived: the generated text
  re-tokenised by the study's tokenizer (smollm2-135m-instruct), plus one for the closing EOS
  when that gives fewer than ``evaluation.max_new_tokens`` (48) tokens. Re-tokenising a decoded
  text can merge or split a token the model generated differently, so the count may be off by
  a token on some items;
* ``length``: minus that token count, a reference: how much does length alone know?
* ``consistency`` (self-consistency, K answers sampled at temperature 1) cannot be recomputed
  from saved predictions: it needs the last round's adapters, which the study did not keep
  (the runs are committed without adapters). `consistency.py` beside this script retrains
  them for ``pe-dynamic`` and ``pe-dynamic-no-constraints`` and compares the two on it
  (``exploratory/consistency.md``, exploratory).

Per arm (10 seeds): mean ± sample std over seeds of each run's AUROC for a correct answer
(``roc-auc``), AURC (``rcc-auc``, lower is better), Brier and the equal-width and equal-mass
ECE (15 bins) (`starlora.confidence`; ``length`` is a ranking, not a probability, so it gets
only the ranking numbers).

**Constraint ablation** (exploratory, uncorrected): ``pe-dynamic-no-constraints`` minus
``pe-dynamic`` on AURC per signal, paired by seed: mean difference, 95% percentile bootstrap
over seeds (2,000 resamples, NumPy seed 0) and the exact two-sided sign-flip p, the study's
paired test (`starlora.study.stats`).

**Stopping, retrospective.** The committed runs have no stop set (no predictions on unlabelled
pool items), so the test set stands in for it: per round, the exact-match share of the test
items' extracted answers with the previous round's (``stop_agreement`` as `starlora.stopping`
computes it) and the mean 1 - ``perplexity`` confidence (``stop_uncertainty``). This is a
proxy: a real stop set is drawn from the pool and never graded; here the items are the test
set's (still never graded by the rule). Each rule (`starlora.stopping.parse_rule`) is run on
those per-round values; a run it never stops goes to its last round. Cost, stated here (not
Pullar-Strecker's): labels saved (final labelled count minus the count at the stop) against
accuracy lost (final accuracy minus accuracy at the stop).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from starlora.confidence import adaptive_ece, aurc, auroc, brier, expected_calibration_error
from starlora.evaluation import prediction_signals
from starlora.io import read_jsonl
from starlora.stopping import parse_rule, stop_index, stop_signals
from starlora.study.stats import bootstrap_diff_ci, sign_flip_p

MAX_NEW_TOKENS = 48
SIGNALS = ("answer", "msp", "perplexity", "length")
RULES = ("agreement >= 0.95 for 2 rounds", "agreement >= 0.5 for 2 rounds",
         "uncertainty <= 0.03 for 2 rounds")


def token_counts(rows: list[dict], tokenizer) -> list[int]:
    """Generated tokens per prediction, re-derived from its text (module doc)."""
    out = []
    for r in rows:
        n = len(tokenizer(r["generated"], add_special_tokens=False)["input_ids"])
        out.append(min(MAX_NEW_TOKENS, n + 1))
    return out


def with_tokens(rows: list[dict], tokenizer) -> list[dict]:
    """`rows` with ``tokens`` and ``logprob_mean`` filled in where they are missing."""
    if all("tokens" in r for r in rows):
        return rows
    counts = token_counts(rows, tokenizer)
    return [{**r, "tokens": n, "logprob_mean": r["logprob"] / n} for r, n in zip(rows, counts)]


def runs_of(arm_dir: Path) -> dict[int, Path]:
    return {int(p.name[4:]): p for p in sorted(arm_dir.glob("seed*")) if p.is_dir()}


def last_round(run: Path) -> int:
    return max(r["round"] for r in read_jsonl(run / "metrics.jsonl"))


def run_numbers(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per signal: roc-auc, rcc-auc and, for probabilities, brier, ece, ece-adaptive."""
    correct = np.array([float(r["correct"]) for r in rows])
    signals = prediction_signals(rows)
    signals["length"] = -np.array([float(r["tokens"]) for r in rows])
    out = {}
    for name in SIGNALS:
        c = signals[name]
        found = {"roc-auc": auroc(c, correct), "rcc-auc": aurc(c, correct)}
        if name != "length":
            found |= {"brier": brier(c, correct),
                      "ece": expected_calibration_error(c, correct)[0],
                      "ece-adaptive": adaptive_ece(c, correct)[0]}
        out[name] = found
    return out


def fmt(values: list[float]) -> str:
    a = np.asarray(values, dtype=float)
    return f"{a.mean():.3f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.3f}"


def main() -> int:
    from starlora.models import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", type=Path, help="the study's runs/ directory (runs/<arm>/seed<s>)")
    args = ap.parse_args()
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    arms = sorted(p.name for p in args.runs.iterdir() if p.is_dir())
    numbers: dict[str, dict[int, dict]] = {}
    curves: dict[str, dict[int, list[dict]]] = {}
    for arm in arms:
        numbers[arm], curves[arm] = {}, {}
        for seed, run in runs_of(args.runs / arm).items():
            metrics = sorted(read_jsonl(run / "metrics.jsonl"), key=lambda r: r["round"])
            preds = [with_tokens(read_jsonl(run / f"rounds/{m['round']}/predictions.jsonl"),
                                 tokenizer) for m in metrics]
            numbers[arm][seed] = run_numbers(preds[-1])
            per_round, before = [], None
            for m, rows in zip(metrics, preds):
                found = stop_signals(before, rows, choice=False)
                per_round.append({**m, **found})
                before = rows
            curves[arm][seed] = per_round

    print("# Confidence signals and label-free stopping on the arith study (exploratory)\n")
    print("Generated by `python results/arith-study/calibration.py results/arith-study/runs` "
          "from the committed predictions (see the script's docstring for every definition). "
          "Exploratory and uncorrected: not part of the study's protocol.\n")
    print("## Per arm: each signal's AUROC for a correct answer and AURC, last round\n")
    print("Mean ± sample std over seeds. roc-auc: higher is better (0.5 = cannot rank); "
          "rcc-auc: lower is better (a signal that cannot rank gets the error rate, shown as "
          "1 - accuracy).\n")
    head = ["arm", "n", "1 - accuracy"] + [f"{s} {q}" for s in SIGNALS
                                           for q in ("roc-auc", "rcc-auc")]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for arm in arms:
        seeds = sorted(numbers[arm])
        err = [1 - curves[arm][s][-1]["accuracy"] for s in seeds]
        cells = [arm, str(len(seeds)), fmt(err)]
        for sig in SIGNALS:
            for q in ("roc-auc", "rcc-auc"):
                cells.append(fmt([numbers[arm][s][sig][q] for s in seeds]))
        print("| " + " | ".join(cells) + " |")
    print("\n## Per arm: calibration of the probability signals, last round\n")
    print("Brier and ECE (15 bins: equal-width `ece`, equal-mass `ece-adaptive`), mean ± std "
          "over seeds. The answer-span ECE is about the error rate: nearly every answer gets "
          "a confidence near 1.\n")
    probs = [s for s in SIGNALS if s != "length"]
    head = ["arm"] + [f"{s} {q}" for s in probs for q in ("brier", "ece", "ece-adaptive")]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for arm in arms:
        seeds = sorted(numbers[arm])
        cells = [arm] + [fmt([numbers[arm][s][sig][q] for s in seeds])
                         for sig in probs for q in ("brier", "ece", "ece-adaptive")]
        print("| " + " | ".join(cells) + " |")

    a, b = "pe-dynamic-no-constraints", "pe-dynamic"
    if a in numbers and b in numbers:
        seeds = sorted(set(numbers[a]) & set(numbers[b]))
        print(f"\n## Constraint ablation on AURC: {a} minus {b} (exploratory, uncorrected)\n")
        print(f"Paired by seed ({len(seeds)} seeds); 95% CI: percentile bootstrap over seeds "
              "(2,000 resamples, NumPy seed 0); p: exact two-sided sign-flip test. Negative = "
              "the ablation ranks its answers better. Self-consistency (retrained adapters): "
              "[consistency.md](consistency.md) (`consistency.py`).\n")
        print("| signal | mean diff | std | 95% CI | p |\n|---|---|---|---|---|")
        for sig in SIGNALS:
            d = np.array([numbers[a][s][sig]["rcc-auc"] - numbers[b][s][sig]["rcc-auc"]
                          for s in seeds])
            lo, hi = bootstrap_diff_ci(d)
            print(f"| {sig} | {d.mean():+.4f} | {d.std(ddof=1):.4f} | [{lo:+.4f}, {hi:+.4f}] "
                  f"| {sign_flip_p(d):.5f} |")

    print("\n## Label-free stopping, retrospective (test set as the stop set's proxy)\n")
    print("Per arm: how many of the seeds the rule stops before the last round, the mean "
          "labelled count at the stop (a run never stopped counts its last round), the mean "
          "accuracy at the stop and at the end, and the mean accuracy lost by stopping (final "
          "minus at the stop; per seed, then averaged) against the labels saved.\n")
    print("| rule | arm | stopped | labelled at stop | accuracy at stop | final accuracy "
          "| accuracy lost | labels saved |\n|---|---|---|---|---|---|---|---|")
    for text in RULES:
        rule = parse_rule(text)
        for arm in arms:
            stopped, at, acc_at, final, lost, saved = 0, [], [], [], [], []
            for seed in sorted(curves[arm]):
                rows = curves[arm][seed]
                i = stop_index(rule, [r.get(rule.field) for r in rows])
                if i is None or i == len(rows) - 1:
                    i = len(rows) - 1
                else:
                    stopped += 1
                at.append(rows[i]["n_labelled"])
                acc_at.append(rows[i]["accuracy"])
                final.append(rows[-1]["accuracy"])
                lost.append(rows[-1]["accuracy"] - rows[i]["accuracy"])
                saved.append(rows[-1]["n_labelled"] - rows[i]["n_labelled"])
            print(f"| {text} | {arm} | {stopped}/{len(at)} | {np.mean(at):.1f} "
                  f"| {np.mean(acc_at):.3f} | {np.mean(final):.3f} | {np.mean(lost):+.3f} "
                  f"| {np.mean(saved):.1f} |")
    print("\n### The proxy signals per round (mean over all runs of all arms)\n")
    print("| round | labelled | agreement | uncertainty | accuracy |\n|---|---|---|---|---|")
    rounds = sorted({r["round"] for arm in arms for rows in curves[arm].values() for r in rows})
    for k in rounds:
        rows = [r for arm in arms for c in curves[arm].values() for r in c if r["round"] == k]
        agree = [r["stop_agreement"] for r in rows if r["stop_agreement"] is not None]
        print(f"| {k} | {np.mean([r['n_labelled'] for r in rows]):g} | "
              f"{np.mean(agree) if agree else math.nan:.3f} | "
              f"{np.mean([r['stop_uncertainty'] for r in rows]):.3f} | "
              f"{np.mean([r['accuracy'] for r in rows]):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
