"""Run (or resume) the screen's runs (results/screen/README.md; exploratory), a few at a time.

    python results/screen/run_screen.py                      # every arm, seeds 0-1
    python results/screen/run_screen.py --workers 1 --arms length,typiclust --seeds 0

Each run is ``starlora run results/arith-study/study.yaml --run-dir results/screen/runs/<arm>/
seed<s> --set seed=<s> <the arm's overrides in arms.yaml>`` in its own process with one thread
(OMP_NUM_THREADS=1), its log beside it (``runs/<arm>/seed<s>.log``). Seed by seed, every arm
of a seed before the next seed, so an interrupted screen holds complete pairs. A finished run
is skipped; an unfinished one resumes exactly where it stopped, so the screen is continued by
running this command again (one at a time). Arms marked ``study: true`` in arms.yaml were run
by the committed study with older code (before scoring while generating, which changed the
first MC pass); they are run again here unless --reuse-study. Seeds 10 and up are refused:
they are kept for the confirmatory study. Uses this checkout's ``src/``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from launch import run_all  # noqa: E402  (results/launch.py: the runner of every study script)

CONFIG = HERE.parent / "arith-study" / "study.yaml"
ARMS: dict[str, dict] = yaml.safe_load((HERE / "arms.yaml").read_text())
#: every arm's seeds; seed 2 only for the README amendment's arms (`table.py --seed-2-arms`)
SEEDS = [0, 1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs-dir", type=Path, default=HERE / "runs")
    ap.add_argument("--workers", type=int, default=2, help="runs at a time (one thread each)")
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated, in this order")
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    ap.add_argument("--reuse-study", action="store_true",
                    help="skip the arms the committed study ran (study: true); table.py then "
                         "reads the study's runs, made with older code")
    args = ap.parse_args()
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        ap.error(f"unknown arm(s) {unknown}; known: {', '.join(ARMS)}")
    if args.reuse_study:
        arms = [a for a in arms if not ARMS[a].get("study")]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if any(s >= 10 for s in seeds):
        ap.error("seeds 10 and up are kept for the confirmatory study")
    runs = [(f"{arm} seed {seed}", args.runs_dir / arm / f"seed{seed}",
             [f"seed={seed}", *ARMS[arm]["set"]]) for seed in seeds for arm in arms]
    return run_all(CONFIG, runs, args.workers)


if __name__ == "__main__":
    sys.exit(main())
