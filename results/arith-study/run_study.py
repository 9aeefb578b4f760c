"""Run (or resume) every run of the arith study (results/PROTOCOL.md), a few at a time.

    python results/arith-study/run_study.py                 # all arms, seeds 0-9, 2 workers
    python results/arith-study/run_study.py --workers 1 --seeds 0,1 --arms random,pe-dynamic
    python results/arith-study/run_study.py --config results/obqa-probe/probe.yaml \
        --runs-dir results/obqa-probe/runs --arms random,pe-dynamic,pe-dynamic-gold --seeds 0,1,2

Each run is ``starlora run study.yaml --run-dir runs/<arm>/seed<s> --set seed=<s> <arm's
overrides>`` in its own process with one thread (OMP_NUM_THREADS=1), its log beside its run
directory (``runs/<arm>/seed<s>.log``). Runs are taken seed by seed, every arm of a seed
before the next seed, so that an interrupted study holds complete pairs. A finished run is
skipped; an unfinished one resumes exactly where it stopped (starlora runs are resumable), so
the study is continued by running this command again. Start one of these at a time. The
runs use this checkout's ``src/`` (put first on PYTHONPATH), whatever starlora the interpreter
has installed: run the command from the checkout of the protocol's commit.

When a run finishes, the same worker slot then runs ``starlora uncertainty <run_dir>`` (the
test items' PE/ME after the last round, for the study's AUROC table; same environment, one
thread) before it takes the next run; finished runs that lack that file are queued first.
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
CONFIG = HERE / "study.yaml"

#: arm name -> overrides of study.yaml (the protocol's arms, results/PROTOCOL.md)
ARMS: dict[str, list[str]] = {
    "random": ["active_learning.strategy=random"],
    "pe": ["active_learning.strategy=pe"],
    "pe-dynamic": ["active_learning.strategy=pe-dynamic"],
    "me-dynamic": ["active_learning.strategy=me-dynamic"],
    "me": ["active_learning.strategy=me"],
    "pe-gold": ["active_learning.strategy=pe", "scoring.answers=gold"],
    "pe-dynamic-gold": ["active_learning.strategy=pe-dynamic", "scoring.answers=gold"],
    "pe-dynamic-no-constraints": ["active_learning.strategy=pe-dynamic",
                                  "training.b_decay_mode=none", "lora.dropout=0",
                                  "scoring.mc_passes=1"],
}
SEEDS = list(range(10))


def finished(run_dir: Path) -> bool:
    try:
        return bool(json.loads((run_dir / "state.json").read_text()).get("finished"))
    except (OSError, ValueError):
        return False


def has_uncertainty(run_dir: Path) -> bool:
    """Whether a finished run has its last round's test_uncertainty.jsonl."""
    try:
        last = json.loads((run_dir / "state.json").read_text())["round"]
    except (OSError, ValueError, KeyError):
        return False
    return (run_dir / "rounds" / str(last) / "test_uncertainty.jsonl").is_file()


def command(step: str, arm: str, seed: int, run_dir: Path, config: Path = CONFIG) -> list[str]:
    """The command of `step`: "run" the run, or score its "uncertainty" once it finished."""
    if step == "uncertainty":
        return [sys.executable, "-m", "starlora.cli", "uncertainty", str(run_dir)]
    sets = [f"seed={seed}", *ARMS[arm]]
    return [sys.executable, "-m", "starlora.cli", "run", str(config), "--run-dir", str(run_dir),
            *[a for s in sets for a in ("--set", s)]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=CONFIG,
                    help="the study's config (default: study.yaml; the OBQA probe's is "
                         "results/obqa-probe/probe.yaml)")
    ap.add_argument("--runs-dir", default=str(HERE / "runs"))
    ap.add_argument("--workers", type=int, default=2, help="runs at a time (one thread each)")
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated, in this order")
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    args = ap.parse_args()
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        ap.error(f"unknown arm(s) {unknown}; known: {', '.join(ARMS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    root = Path(args.runs_dir)
    pairs = [(arm, seed) for seed in seeds for arm in arms]
    todo = [("uncertainty", arm, seed) for arm, seed in pairs
            if finished(root / arm / f"seed{seed}")
            and not has_uncertainty(root / arm / f"seed{seed}")]
    todo += [("run", arm, seed) for arm, seed in pairs if not finished(root / arm / f"seed{seed}")]
    # the code of this checkout, whatever starlora the interpreter has installed
    path = os.pathsep.join([str(HERE.parents[1] / "src"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path.rstrip(os.pathsep), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    running: list[tuple[str, str, int, subprocess.Popen, float]] = []
    failed = 0

    def start(step: str, arm: str, seed: int) -> None:
        run_dir = root / arm / f"seed{seed}"
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        log = open(run_dir.parent / f"seed{seed}.log", "a")  # noqa: SIM115
        proc = subprocess.Popen(command(step, arm, seed, run_dir, args.config.resolve()),
                                stdout=log, stderr=log,
                                env=env)
        running.append((step, arm, seed, proc, time.time()))
        print(f"started {step} {arm} seed {seed}", flush=True)

    print(f"{len(todo)} steps to do ({sum(t[0] == 'run' for t in todo)} runs) with "
          f"{args.workers} workers", flush=True)
    while todo or running:
        while todo and len(running) < args.workers:
            start(*todo.pop(0))
        time.sleep(5)
        for item in list(running):
            step, arm, seed, proc, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            minutes = (time.time() - t0) / 60
            status = "finished" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            failed += proc.returncode != 0
            print(f"{status}: {step} {arm} seed {seed} in {minutes:.1f} min", flush=True)
            if step == "run" and proc.returncode == 0:  # the same slot, before the next run
                start("uncertainty", arm, seed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
