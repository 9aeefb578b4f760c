"""`starlora demo`: a complete small experiment on the embedded model, offline, on a CPU.

It runs the demo config (``demo.yaml`` beside this file: SmolLM2-135M-Instruct on generated
arithmetic problems) once with `random` and once with `pe-dynamic` (STAR), then writes the
report. Both runs are resumable: run the same command again after an interruption.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from starlora.config import load_config
from starlora.report import build_report
from starlora.run.loop import run_experiment
from starlora.run.store import RunStore

DEMO_CONFIG = Path(__file__).with_name("demo.yaml")


def run_demo(
    out: str | Path = "starlora-demo",
    strategies: tuple[str, ...] = ("random", "pe-dynamic"),
    overrides: list[str] | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Run the demo into `out` (runs/<strategy>/ and report/); returns the report's files.

    `overrides` are ``key=value`` config overrides (as ``--set``), e.g. for a quicker check."""
    out = Path(out)
    start = time.perf_counter()
    run_dirs = []
    for strategy in strategies:
        config = load_config(DEMO_CONFIG, [*(overrides or []), f"active_learning.strategy={strategy}"])
        run_dirs.append(out / "runs" / strategy)
        run_experiment(config, run_dirs[-1], progress=progress)
    written = build_report(run_dirs, out / "report")
    minutes = (time.perf_counter() - start) / 60
    print(f"\nstarlora demo finished in {minutes:.1f} min", file=sys.stderr)
    for run_dir in run_dirs:
        curve = ", ".join(f"{m['n_labelled']}: {m['accuracy']:.3f}"
                          for m in RunStore.open(run_dir).metrics())
        print(f"  {run_dir.name:<12} accuracy by labelled count  {curve}")
    for name, path in written.items():
        print(f"  {name}: {path}")
    return written
