"""Run (or resume) the training-recipe pilot of study 2 (issue 35; exploratory, pilot seeds).

    python results/study-2/run_recipe_pilot.py                 # every recipe, seeds 100-102
    python results/study-2/run_recipe_pilot.py --workers 1 --recipes steps24 --seeds 100

Each run is ``starlora run results/arith-study/study.yaml --run-dir
results/study-2/pilot/<recipe>/seed<s> --set seed=<s> --set active_learning.strategy=random
<the recipe's overrides>`` in its own process with one thread, its log beside it. `random`
selects without scores, so a run costs training and evaluation only, and accuracy falling
between rounds is the recipe's doing. Seed by seed, every recipe of a seed before the next.
A finished run is skipped, an unfinished one resumes where it stopped. Seeds 10-21 are
refused (kept for the confirmatory study). Uses this checkout's ``src/``. The design and the
rule that picks the recipe: results/study-2/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "arith-study" / "study.yaml"
#: the recipes compared (README.md says why each)
RECIPES: dict[str, list[str]] = {
    "first": [],                                # the first study's: fresh, 3 epochs, lr 1e-3
    "steps24": ["training.steps=24"],           # 24 optimizer steps every round
    "warm": ["training.warm_start=true"],       # continue from the previous round's adapter
}
SEEDS = [100, 101, 102]


def finished(run_dir: Path) -> bool:
    try:
        return bool(json.loads((run_dir / "state.json").read_text()).get("finished"))
    except (OSError, ValueError):
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs-dir", type=Path, default=HERE / "pilot")
    ap.add_argument("--workers", type=int, default=1, help="runs at a time (one thread each)")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    args = ap.parse_args()
    recipes = [r for r in args.recipes.split(",") if r]
    if unknown := [r for r in recipes if r not in RECIPES]:
        ap.error(f"unknown recipe(s) {unknown}; known: {', '.join(RECIPES)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if any(10 <= s <= 21 for s in seeds):
        ap.error("seeds 10-21 are kept for the confirmatory study")
    todo = [(r, s) for s in seeds for r in recipes
            if not finished(args.runs_dir / r / f"seed{s}")]
    path = os.pathsep.join([str(HERE.parents[1] / "src"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path.rstrip(os.pathsep), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    running: list[tuple[str, int, subprocess.Popen, float]] = []
    failed = 0
    print(f"{len(todo)} runs to do with {args.workers} workers", flush=True)
    while todo or running:
        while todo and len(running) < args.workers:
            recipe, seed = todo.pop(0)
            run_dir = args.runs_dir / recipe / f"seed{seed}"
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            sets = [f"seed={seed}", "active_learning.strategy=random", *RECIPES[recipe]]
            cmd = [sys.executable, "-m", "starlora.cli", "run", str(CONFIG), "--run-dir",
                   str(run_dir), *[a for s in sets for a in ("--set", s)]]
            log = open(run_dir.parent / f"seed{seed}.log", "a")  # noqa: SIM115
            running.append((recipe, seed, subprocess.Popen(cmd, stdout=log, stderr=log, env=env),
                            time.time()))
            print(f"started {recipe} seed {seed}", flush=True)
        time.sleep(5)
        for item in list(running):
            recipe, seed, proc, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            status = "finished" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            failed += proc.returncode != 0
            print(f"{status}: {recipe} seed {seed} in {(time.time() - t0) / 60:.1f} min", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
