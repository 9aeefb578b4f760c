"""Run (or resume) study 2's runs (issue 35): only once its protocol is committed.

    python results/study-2/run_study.py --setting smollm2 --workers 2
    python results/study-2/run_study.py --setting calendar --arms random,pe --seeds 10,11
    python results/study-2/run_study.py --setting smollm2 --status

Refuses to start unless ``results/study-2/PROTOCOL.md``, ``arms.yaml`` and
``comparisons.yaml`` are committed (``git log`` names a commit for each, and none differs
from it): the protocol must exist, in git history, before the first confirmatory run. Refuses
to run, too, on a CPU without native bf16, where the runs' ``auto`` precision would resolve
to fp32 (PROTOCOL.md, Machine). ``arms.yaml`` maps each arm's name to its
``--set`` overrides of ``results/arith-study/study.yaml``; a setting adds its own (`SETTINGS`:
the model, the task) and the study-wide ones of the protocol (`STUDY`). Each run is
``starlora run results/arith-study/study.yaml --run-dir results/study-2/runs/<setting>/<arm>/
seed<s> --set seed=<s> ...`` in its own process with one thread (`results/launch.py`): seed
by seed, every arm of a seed before the next, so an interrupted study holds complete pairs; a
finished run is skipped, an unfinished one resumes exactly where it stopped.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from launch import progress, run_all  # noqa: E402  (results/launch.py: the runner of every study script)

sys.path.insert(0, str(HERE))
from run_recipe_pilot import TASKS  # noqa: E402  (the overrides the task pilots passed with)

CONFIG = HERE.parent / "arith-study" / "study.yaml"
#: the settings (results/study-2/PROTOCOL.md): overrides and seeds
SETTINGS: dict[str, tuple[list[str], list[int]]] = {
    "smollm2": ([], list(range(10, 22))),                                   # (i)
    "calendar": (TASKS["calendar"], list(range(10, 22))),  # (ii), replacing Gemma (README.md)
}
#: overrides every run of the study takes (PROTOCOL.md: the demo's evaluation batch, which left
#: every test answer of two pilot runs as it was at 32, 1.30x faster; docs/benchmarks.md)
STUDY: list[str] = ["evaluation.batch_size=64"]


def committed(path: Path) -> bool:
    """Whether `path` is in git history and unchanged since its last commit."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True)

    logged = git("log", "-1", "--format=%H", "--", str(path)).stdout.strip()
    return bool(logged) and git("diff", "--quiet", "HEAD", "--", str(path)).returncode == 0


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively, as the runs' own `auto` precision decides it
    (`starlora.models.cpu_has_native_bf16` of this checkout's ``src/``)."""
    sys.path.insert(0, str(HERE.parents[1] / "src"))
    from starlora.models import cpu_has_native_bf16

    return cpu_has_native_bf16()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setting", required=True, choices=sorted(SETTINGS))
    ap.add_argument("--workers", type=int, default=2, help="runs at a time (one thread each)")
    ap.add_argument("--arms", default=None, help="comma-separated (default: every arm)")
    ap.add_argument("--seeds", default=None, help="comma-separated (default: the setting's)")
    ap.add_argument("--runs-dir", type=Path, default=HERE / "runs")
    ap.add_argument("--status", action="store_true",
                    help="list each run as finished, begun or not started, and stop")
    args = ap.parse_args()
    declared = (HERE / "PROTOCOL.md", HERE / "arms.yaml", HERE / "comparisons.yaml")
    missing = [p.name for p in declared if not committed(p)]
    if missing:
        ap.error(f"{', '.join(missing)}: not committed as they are; study 2 runs only after its "
                 "protocol is in git history (results/study-2/PROTOCOL.md)")
    arms: dict[str, list[str]] = yaml.safe_load((HERE / "arms.yaml").read_text())
    chosen = args.arms.split(",") if args.arms else list(arms)
    if unknown := [a for a in chosen if a not in arms]:
        ap.error(f"unknown arm(s) {unknown}; arms.yaml has {', '.join(arms)}")
    if not args.status and not native_bf16():
        ap.error("this CPU does not compute bf16 natively (no avx512_bf16 or amx_bf16 among its "
                 "/proc/cpuinfo flags), so `auto` would resolve to fp32: a fresh run would join "
                 "another comparison and a begun one is refused (PROTOCOL.md, Machine: a CPU "
                 "with avx512_bf16). Run the study on such a machine.")
    overrides, seeds = SETTINGS[args.setting]
    if args.seeds:
        seeds = [int(s) for s in args.seeds.split(",")]
    runs = [(f"{args.setting} {a} seed {s}", args.runs_dir / args.setting / a / f"seed{s}",
             [f"seed={s}", *STUDY, *overrides, *arms[a]]) for s in seeds for a in chosen]
    if args.status:
        try:
            print(progress(runs), flush=True)
        except BrokenPipeError:  # ``--status | head``: the reader has gone; stay quiet
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return run_all(CONFIG, runs, args.workers)


if __name__ == "__main__":
    sys.exit(main())
