"""Exploratory (not in the protocol): is the base term of the dynamic arms the answer's length?

    python results/arith-study/base_length.py results/arith-study/runs

The base term `pe_base` of a scored pool item is the frozen base model's PE (a sum over answer
tokens) of an answer: the base model's own greedy answer for the arms on generated answers,
the gold answer for the `-gold` arms. The run directories do not store that answer's length;
the base-score cache does (``n_answer_tokens``, in ``$STARLORA_CACHE/scores`` or
``~/.cache/starlora/scores``), so this needs the cache of a machine that ran the study. An item
is matched to the cache row with its id and the same PE. Per arm, over every round and seed:
the Spearman correlation between `pe_base` and the answer's length in tokens, and the share of
the 16 items with the highest `pe_base` whose answer stopped at the generation limit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from starlora.config import load_config
from starlora.scoring.cache import default_score_cache_dir
from starlora.study.diagnostics import read_rows
from starlora.study.stats import spearman


def cached_lengths(cache_dir: Path) -> dict[str, list[tuple[float, int]]]:
    """``{id: [(pe, n_answer_tokens), ...]}`` of every PE row in the base-score cache."""
    out: dict[str, list[tuple[float, int]]] = {}
    for path in sorted(cache_dir.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line) if line.strip() else {}
            if row.get("pe") is not None and "n_answer_tokens" in row and "id" in row:
                out.setdefault(row["id"], []).append((row["pe"], row["n_answer_tokens"]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", type=Path, help="the study's runs/ directory (runs/<arm>/seed<s>)")
    ap.add_argument("--cache", type=Path, default=default_score_cache_dir())
    args = ap.parse_args()
    lengths = cached_lengths(args.cache)
    print("| arm | rounds x seeds | items matched | rho(pe_base, length) | "
          "top 16 at the limit |")
    print("|---|---|---|---|---|")
    for arm_dir in sorted(p for p in args.runs.iterdir() if p.is_dir()):
        rhos, capped, matched = [], [], []
        for run in sorted(p for p in arm_dir.glob("seed*") if p.is_dir()):
            config = load_config(run / "config.yaml", stored=True)  # the limit of a generated answer
            limit = config.scoring.max_new_tokens or config.evaluation.max_new_tokens
            for scores in sorted(run.glob("rounds/*/scores.jsonl")):
                rows = [r for r in read_rows(scores) or [] if "pe_base" in r]
                pairs = []
                for r in rows:
                    hits = [n for pe, n in lengths.get(r["id"], []) if abs(pe - r["pe_base"]) < 1e-9]
                    if len(hits) == 1:
                        pairs.append((r["pe_base"], hits[0]))
                if len(pairs) < 16:
                    continue
                pe, n = np.array(pairs).T
                matched.append(len(pairs) / len(rows))
                rhos.append(spearman(pe, n))
                capped.append(float(np.mean(n[np.argsort(-pe)[:16]] >= limit)))
        if rhos:
            print(f"| {arm_dir.name} | {len(rhos)} | {min(matched):.0%} or more | "
                  f"{np.mean(rhos):.3f} (range {min(rhos):.3f} to {max(rhos):.3f}) | "
                  f"{np.mean(capped):.3f} (min {min(capped):.3f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
