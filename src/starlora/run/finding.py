"""Which run directories a report reads, and which of them are still going.

`find_runs` turns the paths a user gives (run directories, or folders of them) into run
directories; `unfinished` names those whose state.json does not say finished, which a report
draws up to their last evaluated round (and which then limit a study to the rounds every run
has), and the run directories below a folder that have no evaluated round yet, which no report
can draw.
"""

from __future__ import annotations

from pathlib import Path

from starlora.errors import StarloraError
from starlora.run.store import RunPaths, RunStore


def find_runs(paths: list[str | Path]) -> list[Path]:
    """The run directories `paths` name, in order, each once: a path holding ``metrics.jsonl``
    is one; a folder without it stands for every run directory below it, in sorted order
    (``starlora report results/study-2/runs/smollm2``). A path that is neither stays as it
    is, so that the reader reports its missing ``metrics.jsonl``."""
    found: list[Path] = []
    for path in map(Path, paths):
        below = [] if RunPaths(path).metrics.is_file() or not path.is_dir() else sorted(
            m.parent for m in path.rglob("metrics.jsonl"))
        found += below or [path]
    return list(dict.fromkeys(p.resolve() for p in found))


def _state(run_dir: str | Path) -> dict | None:
    """`run_dir`'s state.json, or None for a run copied without its config.yaml or state."""
    paths = RunPaths(run_dir)
    if not paths.config.is_file() or not paths.state.is_file():
        return None
    return RunStore.open(run_dir).state()


def finished(run_dir: str | Path) -> bool:
    """Whether `run_dir`'s run has finished; one without a config.yaml or a state.json (copied
    without them) counts as finished: nothing says otherwise."""
    state = _state(run_dir)
    return state is None or bool(state.get("finished"))


def unfinished(paths: list[str | Path]) -> tuple[list[str], list[Path]]:
    """(one ``"<run dir> (round r, phase p)"`` per run `find_runs` names that has not finished,
    the run directories below a folder of `paths` that have no evaluated round yet)."""
    going = []
    for run_dir in find_runs(paths):
        state = _state(run_dir) if RunPaths(run_dir).metrics.is_file() else None
        if state is not None and not state.get("finished"):
            phase = state["phase"] or "starting"
            going.append(f"{run_dir} (round {state['round']}, phase {phase})")
    empty = [c.parent.resolve() for p in map(Path, paths)
             if p.is_dir() and not RunPaths(p).metrics.is_file()
             for c in sorted(p.rglob("config.yaml")) if not RunPaths(c.parent).metrics.is_file()]
    return going, empty


def chosen_runs(paths: list[str | Path], *, finished_only: bool = False
                ) -> tuple[list[str | Path], list[str]]:
    """(what a report reads for `paths`, what it says of them): with `finished_only` the
    finished runs alone; the notes name the unfinished runs (left out, or drawn up to their
    last evaluated round) and the run directories with no evaluated round yet."""
    going, empty = unfinished(paths)
    notes = [f"{len(going)} run(s) not finished, "
             + ("left out (--finished-only)" if finished_only else
                "drawn up to their last evaluated round (a study compares the rounds every run "
                "has; --finished-only leaves them out)") + ": " + "; ".join(going)] if going else []
    if empty:
        notes.append(f"{len(empty)} run(s) with no evaluated round yet, left out: "
                     + "; ".join(map(str, empty)))
    if finished_only:
        kept = [d for d in find_runs(paths) if finished(d)]
        if not kept:
            raise StarloraError("no finished run among " + ", ".join(map(str, paths)))
        return list(kept), notes
    return list(paths), notes
