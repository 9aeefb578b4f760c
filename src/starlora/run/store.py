"""The run directory: everything an experiment has labelled and computed, written atomically.

    RUN_DIR/
      config.yaml             resolved config (every field)
      pool.json               {"size", "sha1"} of the pool the run started with
      state.json              {"round": k, "phase": last phase finished in round k}
      labelled.jsonl          {"id", "round", "answer"} per labelled example, in labelling order
      metrics.jsonl           one line per finished round (see `RunStore.record_metrics`)
      rounds/<k>/
        adapter/              peft LoRA adapter trained in round k (safetensors)
        metrics.json          accuracy, ece, reliability bins
        predictions.jsonl     one line per test example
        scores.jsonl          uncertainty scores of the pool examples scored after round k
                              (the columns the strategy needs, and per-pass values)
        selected.jsonl        ids chosen in round k's query, best first: rank, utility and
                              the terms it was mixed from (raw scores, normalised terms, λ)

Every file is written to a temporary name in the same folder and renamed over the target, so a
process killed at any moment leaves either the old or the new file, never half of one. A phase
is marked done in state.json only after its outputs are in place; a resumed run redoes at most
the phase that was interrupted, and every phase is deterministic given the seed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from starlora.config import ExperimentConfig, dump_config, load_config
from starlora.errors import ConfigError, DataError, StarloraError
from starlora.io import atomic_write, read_jsonl, write_json, write_jsonl
from starlora.run.protocol import PHASES, result_changes


class RunStore:
    """Reads and writes one run directory. Only the loop (through this class) writes it."""

    def __init__(self, root: str | Path, config: ExperimentConfig):
        self.root = Path(root)
        self.config = config

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | Path) -> RunStore:
        """Open an existing run directory (for status, report, resume)."""
        root = Path(root)
        if not (root / "config.yaml").is_file():
            raise StarloraError(f"{root}: not a run directory (no config.yaml)")
        return cls(root, load_config(root / "config.yaml"))

    @classmethod
    def create_or_resume(cls, root: str | Path, config: ExperimentConfig) -> RunStore:
        """Start a run in `root`, or resume it when it holds a run of the same experiment.

        Refuses (ConfigError) when the stored config differs in a field that alters results
        (`starlora.run.protocol.result_changes`); result-neutral fields (batch sizes...) and more
        rounds or budget are updated instead.
        """
        root = Path(root)
        if (root / "config.yaml").is_file():
            store = cls.open(root)
            changed = result_changes(store.config, config)
            if changed:
                raise ConfigError(
                    f"{root}: the run directory holds a run with a different config "
                    f"({', '.join(changed)}); use another --run-dir or restore those values"
                )
            if store.config != config:
                store.config = config
                atomic_write(root / "config.yaml", dump_config(config))
            return store
        if root.exists() and any(root.iterdir()):
            raise StarloraError(f"{root}: exists and is not a run directory; choose another")
        root.mkdir(parents=True, exist_ok=True)
        store = cls(root, config)
        atomic_write(root / "config.yaml", dump_config(config))
        store.set_state(0, None)
        return store

    def check_pool(self, size: int, sha1: str, source: str) -> None:
        """Record the pool a run starts with (``pool.json``: size and a hash of its ids), or
        refuse (DataError naming `source`) a resumed run whose pool is another one."""
        path = self.root / "pool.json"
        if not path.is_file():
            write_json(path, {"size": size, "sha1": sha1})
        elif json.loads(path.read_text())["sha1"] != sha1:
            raise DataError(source, None, None,
                            f"the pool differs from the one {self.root} started with")

    def pool_size(self) -> int | None:
        path = self.root / "pool.json"
        return json.loads(path.read_text())["size"] if path.is_file() else None

    # -- state --------------------------------------------------------------------------------
    def state(self) -> dict:
        path = self.root / "state.json"
        return json.loads(path.read_text()) if path.is_file() else {"round": 0, "phase": None}

    def set_state(self, round_: int, phase: str | None, **extra: Any) -> None:
        write_json(self.root / "state.json", {"round": round_, "phase": phase, **extra})

    def done(self, round_: int, phase: str) -> bool:
        """Whether `phase` of `round_` finished in an earlier (or this) process."""
        state = self.state()  # "finished" does not count: a finished run may get more rounds
        if state["round"] != round_:
            return state["round"] > round_
        return state["phase"] is not None and PHASES.index(state["phase"]) >= PHASES.index(phase)

    def round_dir(self, round_: int) -> Path:
        return self.root / "rounds" / str(round_)

    def adapter_dir(self, round_: int) -> Path:
        return self.round_dir(round_) / "adapter"

    # -- labels -------------------------------------------------------------------------------
    def labelled(self) -> list[dict]:
        return read_jsonl(self.root / "labelled.jsonl")

    def add_labels(self, rows: list[dict]) -> None:
        """Append labelled rows ({"id", "round", "answer"}); an id already labelled is an error."""
        current = self.labelled()
        have = {r["id"] for r in current}
        dup = [r["id"] for r in rows if r["id"] in have]
        if dup or len({r["id"] for r in rows}) != len(rows):
            raise StarloraError(f"{self.root}: ids labelled twice: {dup[:5]}")
        write_jsonl(self.root / "labelled.jsonl", current + rows)

    # -- per-round outputs --------------------------------------------------------------------
    def write_round(self, round_: int, name: str, obj: Any) -> None:
        """Write ``rounds/<k>/<name>``: JSON for .json, JSON lines for .jsonl (a list)."""
        path = self.round_dir(round_) / name
        write_jsonl(path, obj) if name.endswith(".jsonl") else write_json(path, obj)

    def read_round(self, round_: int, name: str) -> Any:
        path = self.round_dir(round_) / name
        return read_jsonl(path) if name.endswith(".jsonl") else json.loads(path.read_text())

    def record_metrics(self, line: dict) -> None:
        """Put one round's line in metrics.jsonl (replacing any line for that round)."""
        rows = [r for r in read_jsonl(self.root / "metrics.jsonl") if r["round"] != line["round"]]
        write_jsonl(self.root / "metrics.jsonl", sorted(rows + [line], key=lambda r: r["round"]))

    def metrics(self) -> list[dict]:
        return read_jsonl(self.root / "metrics.jsonl")

    def prune_adapters(self, keep_round: int) -> None:
        """Delete the adapters of rounds before `keep_round` (``output.keep_adapters: last``)."""
        for k in range(keep_round):
            shutil.rmtree(self.adapter_dir(k), ignore_errors=True)

    def status(self) -> dict:
        state, al = self.state(), self.config.active_learning
        labelled, metrics, pool_size = self.labelled(), self.metrics(), self.pool_size()
        return {
            "round": state["round"],
            "rounds": al.rounds,
            "phase": "finished" if state.get("finished") else (state["phase"] or "starting"),
            "n_labelled": len(labelled),
            "n_unlabelled": None if pool_size is None else pool_size - len(labelled),
            "strategy": al.strategy,
            "seed": self.config.seed,
            "task": self.config.task.name,
            "last_metrics": metrics[-1] if metrics else None,
        }
