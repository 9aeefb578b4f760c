"""`starlora demo`: a complete small experiment on the embedded model, offline, on a CPU.

It runs the demo config (``demo.yaml`` beside this file: SmolLM2-135M-Instruct on generated
arithmetic problems) once with `random` and once with the library's default strategy
(`DEFAULT_STRATEGY`: the default of ``active_learning.strategy``, so the demo shows whatever
the evidence made the default), then writes the report. Both runs are resumable: run the
same command again after an interruption. Another seed (``--set seed=1``) adds its two runs
beside the first two, and the report covers every seed.

It also writes ``demo.json`` beside the report: the wall time, whether the runs resumed work
done before (then the time is not the whole demo's), the machine, and each strategy's accuracy
by labelled count. ``docs/hooks/demo_figures.py`` turns it into the README's demo paragraph
and image (``make demo UPDATE_README=1``).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

from starlora import __version__
from starlora.config import ActiveLearningConfig, load_config
from starlora.errors import ConfigError
from starlora.io import write_json
from starlora.report import build_report
from starlora.run.loop import run_experiment
from starlora.run.protocol import result_changes
from starlora.run.store import RunPaths, RunStore

DEMO_CONFIG = Path(__file__).with_name("demo.yaml")
#: the strategy the demo shows against `random`: the config's default, owned by the config
DEFAULT_STRATEGY: str = ActiveLearningConfig.model_fields["strategy"].default
_DEMO_SEED: int = load_config(DEMO_CONFIG).seed


def run_demo(
    out: str | Path = "starlora-demo",
    strategies: tuple[str, ...] = ("random", DEFAULT_STRATEGY),
    overrides: list[str] | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Run the demo into `out` (`run_name`'s folders under runs/, and report/); returns the
    report's files. The report takes every run under runs/: a demo with another seed adds its
    runs beside the first demo's, and the report shows their spread.

    `overrides` are ``key=value`` config overrides (as ``--set``), e.g. for a quicker check."""
    if any(o.split("=", 1)[0].strip() == "active_learning.strategy" for o in overrides or []):
        raise ConfigError("--set active_learning.strategy: the demo runs its strategies "
                          f"({', '.join(strategies)}) side by side; run another with starlora "
                          f"run {DEMO_CONFIG} --set active_learning.strategy=...")
    out = Path(out)
    start = time.perf_counter()
    resumed = (out / "runs").is_dir()  # a run started before: the time is not the whole demo's
    configs = {out / "runs" / run_name(strategy, c.seed): c for strategy in strategies
               for c in [load_config(DEMO_CONFIG, [*(overrides or []),
                                                   f"active_learning.strategy={strategy}"])]}
    for run_dir, config in configs.items():  # all refused before any runs
        if RunPaths(run_dir).config.is_file() and (
                changed := result_changes(RunStore.open(run_dir).config, config)):
            raise ConfigError(f"{out} holds a demo with other settings ({', '.join(changed)}) "
                              f"in {run_dir}; give this one another folder: --out <folder>")
    for run_dir, config in configs.items():
        run_experiment(config, run_dir, progress=progress)
    run_dirs = list(configs)
    written = build_report([out / "runs"], out / "report")  # every run below it
    minutes = (time.perf_counter() - start) / 60
    print(f"\nstarlora demo finished in {minutes:.1f} min"
          + (" (resumed: earlier work not counted)" if resumed else ""), file=sys.stderr)
    write_json(out / "demo.json", {
        "minutes": round(minutes, 2), "resumed": resumed, "starlora": __version__,
        "overrides": list(overrides or []), "cpus": _cpus(),
        "cpu": _cpu_model(), "threads": _torch_threads(),
        "accuracy": {d.name: [[m["n_labelled"], m["accuracy"]]
                              for m in RunStore.open(d).metrics()] for d in run_dirs}})
    for run_dir in run_dirs:
        curve = ", ".join(f"{m['n_labelled']}: {m['accuracy']:.3f}"
                          for m in RunStore.open(run_dir).metrics())
        print(f"  {run_dir.name:<12} accuracy by labelled count  {curve}")
    for name, path in written.items():
        print(f"  {name}: {path}")
    return written


def run_name(strategy: str, seed: int) -> str:
    """The folder under runs/ of `strategy`'s demo run with `seed`: the strategy's name for the
    demo file's own seed (the README's figures), ``<strategy>-seed<seed>`` for another."""
    return strategy if seed == _DEMO_SEED else f"{strategy}-seed{seed}"


def _cpus() -> int:
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _cpu_model() -> str:
    """The CPU's model name (Linux), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()
