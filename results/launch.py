"""Run many `starlora run` commands a few at a time: the runner behind the study scripts
(results/screen/run_screen.py, results/study-2/run_recipe_pilot.py).

Each run is ``python -m starlora.cli run CONFIG --run-dir RUN_DIR --set ...`` in its own process
with one thread (``OMP_NUM_THREADS=1``) and this checkout's ``src/`` first on the path, its
output appended to ``<RUN_DIR>.log`` (e.g. ``runs/pe/seed0.log``). A run whose state.json says
it finished is skipped; an unfinished one resumes where it stopped (`starlora run` resumes a
run directory exactly), so a study is continued by running its script again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def finished(run_dir: Path) -> bool:
    """Whether the run in `run_dir` finished (its state.json says so)."""
    try:
        return bool(json.loads((run_dir / "state.json").read_text()).get("finished"))
    except (OSError, ValueError):
        return False


def progress(runs: Sequence[tuple[str, Path, list[str]]]) -> str:
    """A line per run of `runs` (``(label, run_dir, overrides)``, as `run_all` takes them):
    finished, the rounds it has evaluated so far (``metrics.jsonl``), or not started; then
    the counts."""
    lines, done, begun = [], 0, 0
    for label, run_dir, _ in runs:
        if finished(run_dir):
            lines.append(f"{label}: finished")
            done += 1
        elif not run_dir.exists():
            lines.append(f"{label}: not started")
        else:
            begun += 1
            try:
                rounds = sum(1 for line in (run_dir / "metrics.jsonl").open() if line.strip())
            except OSError:
                rounds = 0
            lines.append(f"{label}: begun, {rounds} rounds evaluated")
    lines.append(f"{done} of {len(runs)} finished, {begun} begun, "
                 f"{len(runs) - done - begun} not started")
    return "\n".join(lines)


def run_all(config: Path, runs: Sequence[tuple[str, Path, list[str]]], workers: int) -> int:
    """Run each ``(label, run_dir, overrides)`` of `runs` not yet finished, in order, at most
    `workers` at a time; `overrides` are ``--set`` values for `config`. Prints a line as each
    starts and ends. Returns 1 if any run failed, else 0."""
    todo = [r for r in runs if not finished(r[1])]
    path = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path.rstrip(os.pathsep), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    running: list[tuple[str, subprocess.Popen, float]] = []
    failed = 0
    print(f"{len(todo)} runs to do with {workers} workers", flush=True)
    while todo or running:
        while todo and len(running) < workers:
            label, run_dir, overrides = todo.pop(0)
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "starlora.cli", "run", str(config), "--run-dir",
                   str(run_dir), *[a for s in overrides for a in ("--set", s)]]
            log = open(run_dir.parent / f"{run_dir.name}.log", "a")  # noqa: SIM115
            running.append((label, subprocess.Popen(cmd, stdout=log, stderr=log, env=env),
                            time.time()))
            print(f"started {label}", flush=True)
        time.sleep(5)
        for item in list(running):
            label, proc, t0 = item
            if proc.poll() is None:
                continue
            running.remove(item)
            status = "finished" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            failed += proc.returncode != 0
            print(f"{status}: {label} in {(time.time() - t0) / 60:.1f} min", flush=True)
    return 1 if failed else 0
