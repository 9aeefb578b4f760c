"""The run directory: everything an experiment has labelled and computed, written atomically.

    RUN_DIR/
      config.yaml             resolved config (every field)
      pool.json               {"size", "sha1"} of the pool the run started with (its ids)
      identity.json           the precision `auto` resolved to and a hash of each split's
                              examples (the stop set's too), checked on resume; the base
                              model's fingerprint and the machine (CPU/GPU model, kernel
                              flags), changes recorded (`starlora.run.identity`)
      state.json              {"round": k, "phase": last phase finished in round k}
      labelled.jsonl          {"id", "round", "answer", "source"} per label, in labelling order
      metrics.jsonl           one line per finished round (see `RunStore.record_metrics`)
      embeddings.safetensors  strategies on embeddings: the frozen base model's embedding of
                              every pool and task.labelled prompt, float32 [P, d], ids in its
                              metadata (`starlora.run.embeddings`)
      queries/<r>.jsonl       human oracle: the queries whose labels round r trains on first
                              (r is "the round" of a query everywhere: status, exports, the
                              annotate page, the log and labelled.jsonl; it was selected by
                              round r-1, so its selection is rounds/<r-1>/selected.jsonl)
      queries/<r>.closed      present once the run went on with those labels
      rounds/<k>/
        adapter/              peft LoRA adapter trained in round k (safetensors)
        train.json            steps, seconds, tokens and final loss of round k's training
        metrics.json          accuracy, ece, reliability bins; per confidence signal its
                              numbers and equal-mass bins (`starlora.evaluation`)
        predictions.jsonl     one line per test example
        stop.jsonl            with active_learning.stop_set: the model's answer to each
                              stop-set item (`starlora.stopping`)
        calibration.json      `starlora calibrate`: the fitted temperature, before and after
        scores.jsonl          uncertainty scores of the pool examples scored after round k
                              (the columns the strategy needs, and per-pass values)
        selected.jsonl        ids chosen in round k's query, best first: rank, utility and
                              the terms it was mixed from (raw scores, normalised terms, λ)
        test_uncertainty.jsonl  last round, on request: PE/ME of each test item's gold and own
                              answer, 1 pass and MC (`starlora.run.uncertainty`)
      .lock                   taken by every writer of labels (`RunStore.lock`)
      .run.lock               held by the `starlora run` working in the directory, for its
                              whole run (`starlora.run.lock`); .run.owner.json says who

`RunPaths` is the one owner of these names; the loop, the report and the CLI go through it.
Every file is written to a temporary name in the same folder and renamed over the target, so a
process killed at any moment leaves either the old or the new file, never half of one. A phase
is marked done in state.json only after its outputs are in place; a resumed run redoes at most
the phase that was interrupted, and every phase is deterministic given the seed. Labels can
come from another process (`starlora import`, `starlora annotate`) while a run is paused:
those writes, and the run's closing of a query, happen under the run's file lock.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from starlora.config import ExperimentConfig, dump_config, load_config
from starlora.errors import ConfigError, DataError, StarloraError
from starlora.io import (
    ParsedJsonl,
    atomic_write,
    file_lock,
    read_json,
    read_jsonl,
    write_json,
    write_jsonl,
)
from starlora.run.label_rows import check_label_rows, merge_labels
from starlora.run.protocol import PHASES, result_changes

#: the files of ``rounds/<k>/`` (see the module docstring); `RunPaths.round_file` refuses others
ROUND_FILES = frozenset({"train.json", "metrics.json", "predictions.jsonl", "scores.jsonl",
                         "selected.jsonl", "test_uncertainty.jsonl", "stop.jsonl",
                         "calibration.json"})


class RunPaths:
    """Where each file of a run directory lives (see the module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.pool = self.root / "pool.json"
        self.identity = self.root / "identity.json"
        self.state = self.root / "state.json"
        self.labelled = self.root / "labelled.jsonl"
        self.metrics = self.root / "metrics.jsonl"
        self.embeddings = self.root / "embeddings.safetensors"
        self.lock = self.root / ".lock"
        self.run_lock = self.root / ".run.lock"
        self.run_owner = self.root / ".run.owner.json"
        #: the lock and owner files any process opening the run leaves (never a result)
        self.bookkeeping = (self.lock, self.run_lock, self.run_owner)
        #: what starting a run writes before its first phase (`RunStore.undo_start`)
        self.start_files = (self.config, self.state, self.pool, self.identity)

    def round_dir(self, round_: int) -> Path:
        """``rounds/<round_>/``."""
        return self.root / "rounds" / str(round_)

    def round_file(self, round_: int, name: str) -> Path:
        """``rounds/<round_>/<name>``, `name` one of `ROUND_FILES` (else ValueError: a
        misspelt name would read a file that is never written)."""
        if name not in ROUND_FILES:
            raise ValueError(f"{name!r} is not a round file ({', '.join(sorted(ROUND_FILES))})")
        return self.round_dir(round_) / name

    def adapter_dir(self, round_: int) -> Path:
        return self.round_dir(round_) / "adapter"

    def test_uncertainty(self, round_: int) -> Path:
        return self.round_file(round_, "test_uncertainty.jsonl")

    def queries(self, label_round: int) -> Path:
        return self.root / "queries" / f"{label_round}.jsonl"

    def closed(self, label_round: int) -> Path:
        return self.root / "queries" / f"{label_round}.closed"

    def query_rounds(self) -> list[int]:
        """Label rounds that have a queries file, ascending."""
        folder = self.root / "queries"
        if not folder.is_dir():
            return []
        return sorted(int(p.stem) for p in folder.glob("*.jsonl") if p.stem.isdigit())


def resume_command(run_dir: str | Path) -> str:
    """The command that resumes the run in `run_dir` from its own ``config.yaml`` (every
    ``--set`` of the first command is in it)."""
    return f"starlora run --run-dir {shlex.quote(str(run_dir))}"


def refuse_foreign(paths: RunPaths) -> None:
    """StarloraError if `paths.root` (without a config.yaml) holds files that no run wrote
    (a run killed while writing its first config.yaml left its temporary file only)."""
    if paths.root.exists() and any(p not in paths.bookkeeping and not p.name.startswith(
            ".config.yaml.") for p in paths.root.iterdir()):
        raise StarloraError(f"{paths.root}: exists and is not a run directory; choose another")


class RunStore:
    """Reads and writes one run directory: the loop drives it, and labels may also arrive
    through `save_labels` from another process while the run waits for them."""

    def __init__(self, root: str | Path, config: ExperimentConfig):
        self.paths = RunPaths(root)
        self.root = self.paths.root
        self.config = config
        self._parsed = ParsedJsonl()  # labels and queries, parsed once per content

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | Path) -> RunStore:
        """Open an existing run directory (for status, report, resume, labelling)."""
        paths = RunPaths(root)
        if not paths.config.is_file():
            raise StarloraError(f"{paths.root}: not a run directory (no config.yaml)")
        return cls(paths.root, load_config(paths.config, stored=True))

    @classmethod
    def create_or_resume(cls, root: str | Path, config: ExperimentConfig, *,
                         save: bool = True) -> RunStore:
        """Start a run in `root`, or resume it when it holds a run of the same experiment.

        Refuses (ConfigError) when the stored config differs in a field that alters results
        (`starlora.run.protocol.result_changes`); result-neutral fields (batch sizes...) and
        more rounds or budget are updated instead: at once, or without `save` by
        `save_config` once the caller's other checks of the resume have passed (a refused
        resume leaves config.yaml as it was).
        """
        paths = RunPaths(root)
        if paths.config.is_file():
            store = cls.open(root)
            changed = result_changes(store.config, config)
            if changed:
                raise ConfigError(
                    f"{paths.root}: the run directory holds a run with a different config "
                    f"({', '.join(changed)}); use another --run-dir, restore those values, or "
                    "resume from the run's own config (its data paths are relative to where "
                    f"it started): starlora run --run-dir {paths.root}"
                )
            store.config = config
            if save:
                store.save_config()
            return store
        refuse_foreign(paths)
        paths.root.mkdir(parents=True, exist_ok=True)
        store = cls(paths.root, config)
        atomic_write(paths.config, dump_config(config))
        store.set_state(0, None)
        return store

    def undo_start(self) -> None:
        """Remove what starting a run wrote before its first phase (config.yaml, state.json,
        pool.json, identity.json), so that a start that failed on its input (a model name
        misspelt, a generation that cannot fit the model) or was interrupted before any work
        does not leave a run directory that refuses the corrected config. The caller knows
        that the run started here; a directory holding anything else is left as it is."""
        ours = {*self.paths.start_files, *self.paths.bookkeeping}
        if self.state().get("phase") is None and all(p in ours for p in self.root.iterdir()):
            for path in self.paths.start_files:
                path.unlink(missing_ok=True)

    def save_config(self) -> None:
        """Write the store's config to config.yaml where it differs from the one there."""
        if load_config(self.paths.config, stored=True) != self.config:
            atomic_write(self.paths.config, dump_config(self.config))

    def lock(self, timeout: float = 60) -> contextlib.AbstractContextManager[None]:
        """The run's label lock, for every read-modify-write of labels (`starlora.io.
        file_lock` on ``.lock``: reentrant within a thread; threads of one process, the
        annotate server's saves, queue in turn)."""
        return file_lock(self.paths.lock, timeout, "the run's lock")

    def check_pool(self, size: int, sha1: str, source: str,
                   labelled: str | None = None) -> None:
        """Record the pool a run starts with (``pool.json``: size and a hash of its ids), or
        refuse (DataError naming `source`) a resumed run whose pool is another one; with a
        `labelled` file (``task.labelled``) the message says how that file can change it."""
        if not self.paths.pool.is_file():
            write_json(self.paths.pool, {"size": size, "sha1": sha1})
        elif read_json(self.paths.pool)["sha1"] != sha1:
            hint = (f"; if neither it nor {labelled} changed: a pool record that repeats a "
                    f"record of {labelled} under another id now leaves the pool (runs started "
                    "before starlora did so kept it); finish this run with the starlora that "
                    "started it, or start another --run-dir") if labelled else ""
            raise DataError(source, None, None,
                            f"the pool differs from the one {self.root} started with (a "
                            "record without an id takes one from its question and answer)"
                            f"{hint}")

    def pool_size(self) -> int | None:
        """The number of pool examples the run started with (None before it recorded them)."""
        return read_json(self.paths.pool)["size"] if self.paths.pool.is_file() else None

    # -- state --------------------------------------------------------------------------------
    def state(self) -> dict:
        """``{"round", "phase"}``: the last phase finished in that round (None: none yet),
        with ``"finished"``/``"stopped"`` once the run ends (state.json)."""
        if not self.paths.state.is_file():
            return {"round": 0, "phase": None}
        try:
            return read_json(self.paths.state)
        except ValueError as e:  # edited, or written by something else than starlora
            raise DataError(str(self.paths.state), None, None, f"not valid JSON ({e})") from e

    def set_state(self, round_: int, phase: str | None, **extra: Any) -> None:
        """Mark `phase` of `round_` done (state.json, atomically; `extra` keys beside)."""
        write_json(self.paths.state, {"round": round_, "phase": phase, **extra})

    def current_round(self) -> int:
        """The round the run is at: while a human query is open, its label round r (the
        round that trains on its answers next); else state.json's round."""
        r = self.open_query()
        return r if r is not None else self.state()["round"]

    def done(self, round_: int, phase: str) -> bool:
        """Whether `phase` of `round_` finished in an earlier (or this) process."""
        state = self.state()  # "finished" does not count: a finished run may get more rounds
        if state["round"] != round_:
            return state["round"] > round_
        return state["phase"] is not None and PHASES.index(state["phase"]) >= PHASES.index(phase)

    def round_dir(self, round_: int) -> Path:
        return self.paths.round_dir(round_)

    def adapter_dir(self, round_: int) -> Path:
        """``rounds/<round_>/adapter/``: the LoRA adapter trained in that round (peft)."""
        return self.paths.adapter_dir(round_)

    def has_adapter(self, round_: int) -> bool:
        """Whether round `round_`'s adapter is saved in the run directory."""
        from starlora.adapters import is_saved_adapter

        return is_saved_adapter(self.adapter_dir(round_))

    # -- labels -------------------------------------------------------------------------------
    def labelled(self) -> list[dict]:
        """Every label, in labelling order: ``{"id", "round", "answer", "source"}``; a row a
        person broke is a DataError naming the file, line and field (`check_label_rows`)."""
        return self._parsed.rows(self.paths.labelled, check_label_rows)

    def add_labels(self, rows: list[dict]) -> None:
        """Append labelled rows (`label_row`); an id already labelled is an error."""
        with self.lock():
            current = self.labelled()
            have = {r["id"] for r in current}
            dup = [r["id"] for r in rows if r["id"] in have]
            if dup or len({r["id"] for r in rows}) != len(rows):
                raise StarloraError(f"{self.root}: ids labelled twice: {dup[:5]}")
            write_jsonl(self.paths.labelled, current + rows)

    # -- queries of a human oracle ------------------------------------------------------------
    def write_queries(self, label_round: int, rows: list[dict]) -> None:
        """The queries whose answers round `label_round` trains on, highest utility first."""
        write_jsonl(self.paths.queries(label_round), rows)

    def queries(self, label_round: int) -> list[dict]:
        """The queries whose labels `label_round` trains on first (queries/<r>.jsonl)."""
        return self._parsed.rows(self.paths.queries(label_round))

    def open_query(self) -> int | None:
        """The label round whose queries wait for answers (None when there is none): the
        latest queries file that the run has not closed."""
        rounds = self.paths.query_rounds()
        if not rounds or self.paths.closed(rounds[-1]).exists():
            return None
        return rounds[-1]

    def pending(self) -> list[dict]:
        """The open query's rows that have no label yet, highest utility first."""
        r = self.open_query()
        if r is None:
            return []
        have = {row["id"] for row in self.labelled()}
        return [q for q in self.queries(r) if q["id"] not in have]

    def save_labels(self, answers: dict[str, str], source: str) -> int:
        """Store answers to the open query, replacing earlier answers to it (they may be
        revised until the run goes on). Ids must be in the open query; the caller checks them
        first (`starlora.run.labels`), this re-checks under the lock. A revision keeps its
        row's place, the saved answer again changes nothing (`merge_labels`). Returns how
        many rows it added or changed."""
        with self.lock():
            r = self.open_query()
            asked = {q["id"] for q in self.queries(r)} if r is not None else set()
            outside = sorted(set(answers) - asked)
            if outside:
                raise StarloraError(f"{self.root}: not in the open query: {outside[:5]}")
            rows = self.labelled()
            changed = merge_labels(rows, answers, r, source)
            if changed:
                write_jsonl(self.paths.labelled, rows)
            return changed

    def close_query(self, label_round: int) -> bool:
        """Close `label_round`'s query if every one of its ids is labelled (under the lock, so
        no label lands after the run took the set). Returns whether it is closed."""
        with self.lock():
            if self.paths.closed(label_round).exists():
                return True
            if self.pending():
                return False
            atomic_write(self.paths.closed(label_round), "")
            return True

    # -- per-round outputs --------------------------------------------------------------------
    def write_round(self, round_: int, name: str, obj: Any) -> None:
        """Write ``rounds/<k>/<name>``: JSON for .json, JSON lines for .jsonl (a list)."""
        path = self.paths.round_file(round_, name)
        write_jsonl(path, obj) if name.endswith(".jsonl") else write_json(path, obj)

    def read_round(self, round_: int, name: str) -> Any:
        """``rounds/<round_>/<name>``: JSON Lines as a list of objects, JSON as its value."""
        path = self.paths.round_file(round_, name)
        return read_jsonl(path) if name.endswith(".jsonl") else json.loads(path.read_text())

    def record_metrics(self, line: dict) -> None:
        """Put one round's line in metrics.jsonl (replacing any line for that round)."""
        rows = [r for r in self.metrics() if r["round"] != line["round"]]
        write_jsonl(self.paths.metrics, sorted(rows + [line], key=lambda r: r["round"]))

    def metrics(self) -> list[dict]:
        """metrics.jsonl: one object per evaluated round (see `record_metrics`)."""
        return read_jsonl(self.paths.metrics)

    def write_embeddings(self, ids: list[str], values: np.ndarray) -> None:
        """Store the run's prompt embeddings: `values` [len(ids), d], row i the prompt of
        ``ids[i]``, as float32 safetensors (tensor ``embeddings``, metadata ``ids`` as JSON)."""
        from safetensors.numpy import save

        if np.shape(values)[0] != len(ids):
            raise ValueError(f"{np.shape(values)[0]} embeddings for {len(ids)} ids")
        blob = save({"embeddings": np.ascontiguousarray(values, np.float32)},
                    metadata={"ids": json.dumps(ids)})
        atomic_write(self.paths.embeddings, blob)

    def embeddings(self) -> tuple[list[str], np.ndarray] | None:
        """(ids [P], embeddings [P, d] float32) as `write_embeddings` stored them, or None."""
        from safetensors import safe_open

        if not self.paths.embeddings.is_file():
            return None
        with safe_open(str(self.paths.embeddings), framework="np") as f:
            return json.loads(f.metadata()["ids"]), f.get_tensor("embeddings")

    def prune_adapters(self, keep_round: int) -> None:
        """Delete the adapters of rounds before `keep_round` (``output.keep_adapters: last``)."""
        for k in range(keep_round):
            shutil.rmtree(self.adapter_dir(k), ignore_errors=True)

    def status(self) -> dict[str, Any]:
        """Where the run stands, as `starlora.run.status.run_status` describes (its keys)."""
        from starlora.run.status import run_status

        return run_status(self)
