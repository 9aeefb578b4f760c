"""Exploratory pre-check for the screen (issue 33, item 6), without training: what would STAR's
base term measure if the frozen base model scored the *adapted* model's answer (``scoring.
base_scores: adapted``) instead of its own greedy answer (``own``, what the study ran)?

    OMP_NUM_THREADS=1 nice -n 19 python results/screen/precheck.py results/arith-study/runs \\
        --arms pe-dynamic --seeds 0 1 2 --rounds 0 > results/screen/precheck.md

For every scored pool item of the chosen runs (``rounds/<k>/scores.jsonl``: 200 items per
query round, 6 query rounds):

* ``own``: the committed ``pe_base`` (base model, its own greedy answer). Its answer's length
  comes from regenerating that greedy answer (`starlora.scoring.base_answers`, cached); the
  first run's round 0 is re-scored to check that the regenerated answers are the scored ones.
* ``adapted``: the base model's PE of the adapted model's answer as the run stored it
  (``answer``, the stripped text): re-tokenised as training tokenises a target
  (`Task.encode`), with EOS appended when it is shorter than the generation limit (a text cut
  at the limit had no EOS). Re-tokenising a decoded text can differ from the generated tokens
  by a token here and there; the adapters of those rounds are gone (``keep_adapters: last``),
  so this is the closest the committed runs allow.
* ``/tok``: the same divided by the answer's tokens (item 2's length-normalised PE).

Per (seed, round) it computes Spearman's rho of each term with the problem's number of steps
(1-3) and with the scored answer's length in tokens, the share of the term's top 16 whose
answer stopped at the limit, and the share of one-step problems in the top 16 of the round's
STAR utility λ(t)·minmax(base) + (1-λ(t))·minmax(pe) with λ(t) as the run used it (0.9 at t=0
down to 0.1), next to the pool's own share (what `random` takes on average). Reported: the mean
and range over seeds × rounds. Exploratory: nothing here is part of the study's protocol.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from starlora.acquisition import make_strategy
from starlora.config import load_config
from starlora.study.diagnostics import read_rows
from starlora.study.stats import spearman

TOP = 16


def _runs(root: Path, arms: list[str], seeds: list[int]) -> list[Path]:
    return [root / arm / f"seed{s}" for arm in arms for s in seeds
            if (root / arm / f"seed{s}" / "config.yaml").is_file()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", type=Path, help="the study's runs/ directory (runs/<arm>/seed<s>)")
    ap.add_argument("--arms", nargs="+", default=["pe-dynamic"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--rounds", nargs="+", type=int, default=None, help="default: all")
    ap.add_argument("--own-lengths", type=int, default=1,
                    help="regenerate the base model's own answers (their lengths) for the "
                         "first N scored rounds only (default 1)")
    args = ap.parse_args()

    from starlora.models import load_model
    from starlora.run.data import load_data, make_task
    from starlora.scoring import (
        BaseScoreCache,
        base_answers,
        base_cache_key,
        default_score_cache_dir,
        score_base,
    )
    from starlora.scoring.options import resolve_dtype

    runs = _runs(args.runs, args.arms, args.seeds)
    if not runs:
        print("no runs found", file=sys.stderr)
        return 1
    cfg = load_config(runs[0] / "config.yaml", stored=True)
    task = make_task(cfg.task)
    pool = {ex.id: ex for ex in load_data(cfg.task, task).pool}
    steps = {i: ex.meta["steps"] for i, ex in pool.items()}
    limit = cfg.scoring.max_new_tokens or cfg.evaluation.max_new_tokens
    loaded = load_model(cfg.model.name, device="cpu", dtype="float32")
    model, tok = loaded.model, loaded.tokenizer
    dtype = resolve_dtype(cfg.scoring.dtype, next(model.parameters()).device, torch_float32())
    max_length = cfg.training.max_length
    opts = dict(measures=("pe",), dtype=dtype, max_length=max_length, progress=True)
    cache = BaseScoreCache(default_score_cache_dir(), base_cache_key(
        loaded.fingerprint, measures=("pe",), dtype=dtype, max_length=max_length))

    table = []  # (run, round, rows)
    for run in runs:
        for path in sorted(run.glob("rounds/*/scores.jsonl"), key=lambda p: int(p.parent.name)):
            if args.rounds is not None and int(path.parent.name) not in args.rounds:
                continue
            table.append((run, int(path.parent.name), read_rows(path) or []))
    # own answers are regenerated for the first --own-lengths scored rounds only (48-token
    # generation is the slow part on a shared CPU); the other rounds use the committed pe_base
    ids = sorted({r["id"] for _, _, rows in table[:args.own_lengths] for r in rows})
    t0 = time.time()
    prompts = [task.prompt_ids(tok, pool[i], max_length) for i in ids]
    own_tokens = dict(zip(ids, base_answers(model, tok, prompts, fingerprint=loaded.fingerprint,
                                            dtype=next(model.parameters()).dtype,
                                            max_new_tokens=limit,
                                            batch_size=cfg.evaluation.batch_size).tokens))
    # check: the regenerated own answers are the ones the run scored (its pe_base)
    run0, _, rows0 = table[0]
    check = score_base(model, tok, task, [pool[r["id"]] for r in rows0], cache=cache,
                       answer_ids=[own_tokens[r["id"]] for r in rows0],
                       desc="re-scoring round 0's own answers", **opts)
    own_gap = float(np.max(np.abs(check.pe - np.array([r["pe_base"] for r in rows0]))))

    # the adapted answers, as training tokenises a target
    def adapted_ids(row: dict) -> list[int]:
        _, answer = task.encode(tok, pool[row["id"]], answer=row["answer"], add_eos=False)
        return answer[:limit] if len(answer) >= limit else answer + [tok.eos_token_id]

    flat = [(k, r) for k, (_, _, rows) in enumerate(table) for r in rows]
    answers = [adapted_ids(r) for _, r in flat]
    scored = score_base(model, tok, task, [pool[r["id"]] for _, r in flat], cache=cache,
                        answer_ids=answers, desc="base model on the adapted answers", **opts)
    seconds = time.time() - t0
    eos = tok.eos_token_id

    def capped(tokens: list[int]) -> bool:  # stopped at the limit, not by EOS
        return len(tokens) >= limit and tokens[-1] != eos

    adapted = {}
    for (k, _r), pe, a in zip(flat, scored.pe, answers):
        adapted.setdefault(k, []).append((float(pe), len(a), capped(a)))

    stats: dict[str, list[tuple[float, float, float]]] = {}
    batches: dict[str, list[float]] = {}
    pool_one: list[float] = []
    for k, (run, round_, rows) in enumerate(table):
        s = np.array([steps[r["id"]] for r in rows], float)
        pool_one.append(float(np.mean(s == 1)))
        known = k < args.own_lengths
        own_n = np.array([len(own_tokens[r["id"]]) if known else np.nan for r in rows], float)
        own_cap = np.array([capped(own_tokens[r["id"]]) if known else np.nan for r in rows])
        own = np.array([r["pe_base"] for r in rows])
        ad, ad_n, ad_cap = (np.array(x) for x in zip(*adapted[k]))
        ad, ad_n = ad.astype(float), ad_n.astype(float)
        full = np.array([r["pe"] for r in rows])
        terms = {"own": (own, own_n, own_cap), "own /tok": (own / own_n, own_n, own_cap),
                 "adapted": (ad, ad_n, ad_cap), "adapted /tok": (ad / ad_n, ad_n, ad_cap),
                 "pe (adapter, own answer)": (full, ad_n, ad_cap)}
        for name, (u, n, cap) in terms.items():
            if name == "own /tok" and not known:
                continue
            top = np.argsort(-u, kind="stable")[:TOP]
            stats.setdefault(name, []).append((
                spearman(u, s), spearman(u, n) if known or not name.startswith("own") else np.nan,
                float(np.mean(cap[top])) if known or not name.startswith("own") else np.nan))
        n_queries = max(1, load_config(run / "config.yaml", stored=True).active_learning.rounds - 1)
        star = make_strategy("pe-dynamic", n_queries=n_queries)
        for name in ("own", "adapted", "adapted /tok"):
            base = terms[name][0]
            u = star.utility({"pe": full if "/tok" not in name else full / ad_n,
                              "pe_base": base}, n=len(rows), query_index=round_,
                             rng=np.random.default_rng(0))
            batches.setdefault(name, []).append(float(np.mean(s[np.argsort(-u)[:TOP]] == 1)))
        batches.setdefault("pe (adapter only)", []).append(
            float(np.mean(s[np.argsort(-full)[:TOP]] == 1)))

    def cell(values: list[float]) -> str:
        v = np.array(values, float)
        v = v[~np.isnan(v)]
        if not len(v):
            return "-"
        return f"{v.mean():+.3f} ({v.min():+.3f} to {v.max():+.3f}; n={len(v)})"

    print("# Pre-check: the base term on the adapted answer vs on its own answer (exploratory)\n")
    print(f"Runs: {', '.join(str(r) for r in runs)}; {len(table)} scored rounds x "
          f"{len(table[0][2])} pool items ({len(flat)} rows). The base model's own answers "
          f"(for the own term's length columns and `own /tok`) regenerated for the first "
          f"{args.own_lengths} scored round(s) only; the own term itself is the committed "
          "`pe_base` everywhere. "
          f"Generation limit {limit} tokens. Own answers regenerated and re-checked on "
          f"{run0.name} round 0: max |pe_base - re-scored| = {own_gap:.2e} nats. "
          f"Model work {seconds:.0f} s (CPU, OMP_NUM_THREADS as set).\n")
    print("Mean (range) over seeds x rounds:\n")
    print("| term | rho(term, steps) | rho(term, answer length) | top 16 at the limit |")
    print("|---|---|---|---|")
    for name, values in stats.items():
        a, b, c = zip(*values)
        print(f"| {name} | {cell(a)} | {cell(b)} | {cell(c)} |")
    print("\nShare of one-step problems in the top 16 of STAR's utility (pe-dynamic, minmax, "
          "λ(t) as run), by base term:\n")
    print("| base term in the mix | one-step share, all rounds | round 0 (λ = 0.9) |")
    print("|---|---|---|")
    first = [k for k, (_, r, _) in enumerate(table) if r == 0]
    print(f"| (pool: what random takes on average) | {cell(pool_one)} | "
          f"{cell([pool_one[k] for k in first])} |")
    for name, values in batches.items():
        print(f"| {name} | {cell(values)} | {cell([values[k] for k in first])} |")
    return 0


def torch_float32():
    import torch

    return torch.float32


if __name__ == "__main__":
    sys.exit(main())
