"""Run (or resume) the training-recipe pilot of study 2 (issue 35; exploratory, pilot seeds).

    python results/study-2/run_recipe_pilot.py                 # every recipe, seeds 100-102
    python results/study-2/run_recipe_pilot.py --workers 1 --recipes steps24 --seeds 100
    python results/study-2/run_recipe_pilot.py --model gemma3-270m --recipes first   # Gemma pilot
    python results/study-2/run_recipe_pilot.py --task calendar --recipes first       # calendar pilot

Each run is ``starlora run results/arith-study/study.yaml --run-dir
results/study-2/pilot/<recipe>/seed<s> --set seed=<s> --set active_learning.strategy=random
<the recipe's overrides>`` in its own process with one thread, its log beside it. `random`
selects without scores, so a run costs training and evaluation only, and accuracy falling
between rounds is the recipe's doing. Seed by seed, every recipe of a seed before the next.
A finished run is skipped, an unfinished one resumes where it stopped. Seeds 10-21 are
refused (kept for the confirmatory study). ``--model NAME`` adds ``model.name=NAME`` and puts
the runs in ``pilot-<NAME>/`` (the Gemma pilot); ``--task NAME`` adds `TASKS`' overrides and
puts them in ``pilot-<NAME>/`` (the calendar pilot). Uses this checkout's ``src/``. The design and
the rule that picks the recipe: results/study-2/README.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from launch import run_all  # noqa: E402  (results/launch.py: the runner of every study script)

CONFIG = HERE.parent / "arith-study" / "study.yaml"
#: the recipes compared (README.md says why each)
RECIPES: dict[str, list[str]] = {
    "first": [],                                # the first study's: fresh, 3 epochs, lr 1e-3
    "steps24": ["training.steps=24"],           # 24 optimizer steps every round
    "warm": ["training.warm_start=true"],       # continue from the previous round's adapter
    # Gemma's lr pilot: lr 3e-3; two rounds, 16 labels then one query of 96 (112 labels)
    "lr3e-3x2": ["training.lr=0.003", "active_learning.rounds=2",
                 "active_learning.query_size=96"],
}
SEEDS = [100, 101, 102]
#: another task's overrides (calendar: its worked answers take up to 57 tokens, over the 48 of
#: study.yaml; starlora.tasks.calendar)
TASKS: dict[str, list[str]] = {"calendar": ["task.name=calendar", "evaluation.max_new_tokens=64"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs-dir", type=Path, default=None,
                    help="default: pilot/, or pilot-<model>/ with --model, pilot-<task>/ "
                         "with --task")
    ap.add_argument("--model", default=None, help="another model (model.name)")
    ap.add_argument("--task", default=None, choices=sorted(TASKS), help="another task")
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
    other = ([f"model.name={args.model}"] if args.model else []) + TASKS.get(args.task, [])
    suffix = "".join(f"-{x}" for x in (args.model, args.task) if x)
    runs_dir = args.runs_dir or HERE / f"pilot{suffix}"
    runs = [(f"{r} seed {s}", runs_dir / r / f"seed{s}",
             [f"seed={s}", "active_learning.strategy=random", *other, *RECIPES[r]])
            for s in seeds for r in recipes]
    return run_all(CONFIG, runs, args.workers)


if __name__ == "__main__":
    sys.exit(main())
