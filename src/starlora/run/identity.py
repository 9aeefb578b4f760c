"""What a run computed with, beyond its config: the precision its ``auto`` settings resolved to
and the contents of its data. Both are recorded in ``identity.json`` when the run starts and
checked on every resume, so a run cannot silently change them half way; ``starlora
uncertainty`` and ``starlora calibrate`` check the precision too (`require_precision`) before
they compute on the run's last adapter.

* **precision** (`resolved_precision`): ``model.dtype``, ``scoring.dtype`` and
  ``training.mixed_precision`` as they resolved on the hardware (``auto`` is bf16 on GPUs and
  on CPUs with native bf16, fp32 elsewhere). ``model.device`` is result-neutral, but moving a
  run from a CPU to a GPU would switch ``auto`` to another precision: a resume whose
  precision differs is refused (ConfigError) unless ``--allow-precision-change`` is given;
  the change is then recorded (``precision_changes``: where the run resumed and the new
  values) and the run keeps its protocol id. The precision is part of the protocol id
  (`starlora.run.protocol.protocol_id`), so fp32 and bf16 runs are never averaged together.
* **data** (`data_hashes`): a SHA-1 of the examples each split holds after loading (pool,
  test, task.labelled): their ids, questions and, where the run reads them, answers (the
  pool's answers only with a simulated oracle or gold scoring; people may add answers to a
  human-oracle pool without changing what the run computed, if its records have ids: a
  derived id hashes the answer, `starlora.datafiles.derive_id`). An edited answer, question or
  test record is refused on resume (DataError naming the file).
* **weights** (`check_weights`): the base model's fingerprint
  (`starlora.models.model_fingerprint`). Not refused (a folder's fingerprint reads file
  times): a resume on other weights says so and records it (``weights_changes``).
* **machine** (`machine`): the device kind, the CPU's or GPU's model name and the CPU
  features that choose bf16/fp32 kernels. Not refused: a run resumed on another machine is a
  valid draw of the same procedure, but not the bytes a one-machine run gives (bf16 training
  rounds differently on, say, an AMD Zen 4 and an Intel Xeon with AMX, same torch build). The
  resume says so and records it (``machine_changes``: where it resumed and the new machine).

Runs from before this record (no ``identity.json``, or one without ``data``) are legacy: the
first resume records what it finds, trusting that it is what the run started with (their
earlier rounds cannot be checked), and such a run keeps its protocol id without a precision
suffix (``legacy``), so the rounds it adds group with the rounds it has.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from starlora.config import ExperimentConfig
from starlora.errors import ConfigError, DataError
from starlora.io import read_json, write_json
from starlora.run.protocol import PRECISION_KEYS
from starlora.run.store import RunPaths, RunStore
from starlora.tasks import Example


def resolved_precision(config: ExperimentConfig, model: Any) -> dict[str, str]:
    """``{key: resolved value}`` for `PRECISION_KEYS`, for `model` as loaded (its weights'
    dtype and device): ``"float32"``, ``"bfloat16"``, ``"float16"``; mixed precision
    ``"no"``, ``"bf16"`` or ``"fp16"`` (as `starlora.train_setup.resolve_mixed_precision`)."""
    from starlora.scoring.options import resolve_dtype
    from starlora.train_setup import resolve_mixed_precision

    weights = next(model.parameters())
    scoring = resolve_dtype(config.scoring.dtype, weights.device, weights.dtype)
    return {
        "model.dtype": _name(weights.dtype),
        "scoring.dtype": _name(scoring if scoring is not None else weights.dtype),
        "training.mixed_precision": resolve_mixed_precision(config.training.mixed_precision,
                                                            weights.device),
    }


def _name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def examples_sha1(examples: Sequence[Example], answers: bool = True) -> str:
    """SHA-1 of `examples`' ids, questions and (with `answers`) answers, in order."""
    h = hashlib.sha1()
    for ex in examples:
        h.update(json.dumps([ex.id, ex.question, ex.answer if answers else None]).encode())
        h.update(b"\n")
    return h.hexdigest()


def data_hashes(config: ExperimentConfig, pool: Sequence[Example], test: Sequence[Example],
                labelled: Sequence[Example], stop: Sequence[Example] = ()
                ) -> dict[str, dict[str, str]]:
    """``{split: {"source", "sha1"}}`` of the run's pool, test and task.labelled examples,
    and of its stop set (`active_learning.stop_set`, drawn from the pool; no answers)."""
    t = config.task
    generated = f"task {t.name} (generated)"
    pool_answers = (config.active_learning.oracle == "simulated"
                    or config.scoring.answers == "gold")
    out = {"pool": {"source": t.train or generated, "sha1": examples_sha1(pool, pool_answers)},
           "test": {"source": t.test or generated, "sha1": examples_sha1(test)}}
    if labelled:
        out["labelled"] = {"source": str(t.labelled), "sha1": examples_sha1(labelled)}
    if stop:
        out["stop"] = {"source": t.train or generated, "sha1": examples_sha1(stop, False)}
    return out


def _read(store: RunStore) -> dict:
    return _identity_file(store.root)


def first_plan(store: RunStore, planned: int) -> int:
    """The training rounds the run planned when it started: they size its λ schedule for good,
    so that a run extended with more rounds does not stretch λ again (it would rise after the
    extension); queries past the first plan keep the λ of its last query (``lambda_end``;
    ``lambda_start`` for a plan of one query). Recorded in identity.json
    (``"plan"``) the first time, read back after. `planned`: the rounds the run's stored config
    plans, read before an extension is saved (for a run from before the record, the plan it
    last ran with)."""
    identity = _read(store)
    if "plan" not in identity:
        write_json(store.paths.identity, {**identity, "plan": {"rounds": int(planned)}})
        return int(planned)
    return int(identity["plan"]["rounds"])


def check_data(store: RunStore, data: dict[str, dict[str, str]]) -> None:
    """Record `data` (`data_hashes`) in a run that has none yet, or refuse (DataError naming
    the file) a resume whose pool, test or labelled examples differ from the recorded ones."""
    identity = _read(store)
    recorded = identity.get("data")
    if recorded is None:
        write_json(store.paths.identity, {**identity, "data": data})
        return
    if "stop" in data and "stop" not in recorded:  # recorded before the stop set was
        recorded = {**recorded, "stop": data["stop"]}
        write_json(store.paths.identity, {**identity, "data": recorded})
    verify_data(store, data, ("pool", "test", "labelled", "stop"))


def verify_data(store: RunStore, data: dict[str, dict[str, str]],
                splits: Sequence[str]) -> None:
    """Refuse (DataError naming the file) `data` (`data_hashes`) whose `splits` differ from
    the run's recorded ones; writes nothing (``starlora calibrate`` and ``uncertainty``
    rebuild the run's data and check it so). A run that recorded none is not checked."""
    recorded = _read(store).get("data")
    for split in splits if recorded is not None else ():
        then, now = recorded.get(split), data.get(split)
        if then == now:
            continue
        source = (now or then)["source"]
        raise DataError(source, None, None,
                        f"the {'stop set' if split == 'stop' else split} examples differ "
                        f"from those {store.root} started with "
                        f"(an id, a question or an answer changed{_was(then, now)}); restore "
                        "the file or start another --run-dir")


def _was(then: dict | None, now: dict | None) -> str:
    if then is None or now is None:
        return "; the run had " + ("no" if then is None else "a") + " task.labelled file"
    return f"; it was {then['source']}" if then["source"] != now["source"] else ""


def check_precision(store: RunStore, precision: dict[str, str], state: dict, *,
                    allow_change: bool = False) -> dict[str, str] | None:
    """Record `precision` (`resolved_precision`) in a run that has none yet, or refuse
    (ConfigError) a resume that resolves it differently, unless `allow_change` (the change is
    then recorded with the `state` it resumed from: the round, and the last phase done in
    it). Returns the precision of the run's protocol id: the
    recorded one, or None for a legacy run (one that recorded it only after its first
    round)."""
    identity = _read(store)
    recorded = identity.get("precision")
    if recorded is None:
        legacy = bool(store.metrics())  # rounds computed before precision was recorded
        write_json(store.paths.identity, {**identity, "precision": precision, "legacy": legacy})
        return None if legacy else precision
    changed = _changes(_current(identity, "precision"), precision)
    if changed and not allow_change:
        raise ConfigError(
            f"{store.root}: this resume would compute in another precision ({'; '.join(changed)}"
            "; `auto` resolves by hardware); resume where it resolves as before, or pass "
            "--allow-precision-change to go on in the new precision (recorded in "
            f"{store.paths.identity.name})")
    if changed:
        _record_change(store, identity, "precision", precision, state)
    return None if identity.get("legacy") else recorded


#: CPU features (``/proc/cpuinfo`` flags) that decide which bf16/fp32 kernels torch runs
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


def machine(device: str) -> dict[str, Any]:
    """What computes a run's numbers here: ``{"device": "cpu" | "cuda" | ..., "name": the CPU
    (``/proc/cpuinfo`` model name, else `platform.processor`) or GPU model, "flags": the CPU's
    `KERNEL_FLAGS` (sorted; empty where /proc/cpuinfo is not readable)}``, and on a CPU
    ``"threads"``: torch's thread count, with which bf16 arithmetic rounds differently."""
    import torch

    kind = torch.device(device).type
    name, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines()
                        if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        name = info.get("model name", name)
        flags = sorted(set(info.get("flags", "").split()) & set(KERNEL_FLAGS))
    except OSError:
        pass
    if kind == "cuda":
        name = torch.cuda.get_device_name(torch.device(device))
    here: dict[str, Any] = {"device": kind, "name": name, "flags": flags}
    if kind == "cpu":
        here["threads"] = torch.get_num_threads()
    return here


def started_with(run_dir: str | Path) -> dict[str, dict[str, str] | None]:
    """What the run at `run_dir` recorded it started with, read only (nothing is written):
    ``{"precision": {PRECISION_KEYS key: resolved value} or None, "data": {split: sha1} or
    None}`` (`data_hashes`' splits: pool, test, and labelled and stop where the run has them);
    None where ``identity.json`` does not record it (runs from before the record)."""
    identity = _identity_file(run_dir)
    data = identity.get("data")
    return {"precision": identity.get("precision"),
            "data": None if data is None else {k: v["sha1"] for k, v in data.items()}}


def _identity_file(run_dir: str | Path) -> dict[str, Any]:
    path = RunPaths(run_dir).identity
    return read_json(path) if path.is_file() else {}


def machine_moves(run_dir: str | Path) -> list[str]:
    """Each resume of the run at `run_dir` on another machine (``machine_changes`` in its
    ``identity.json``), in order, as ``"round R (after PHASE) on NAME"`` (``before its first
    phase`` where it resumed with none of round R done); [] when it ran on one machine, or
    recorded none."""
    identity = _identity_file(run_dir)
    return [f"round {c['round']} ("
            + (f"after {c['after_phase']}" if c["after_phase"] else "before its first phase")
            + f") on {c['machine']['name']}" for c in identity.get("machine_changes", [])]


def check_machine(store: RunStore, here: dict[str, Any], state: dict) -> str | None:
    """Record `here` (`machine`) in a run that has none yet; on a resume elsewhere (another
    device, model name or kernel flags than the run's last), record the change with the
    `state` it resumed from and return a warning to print. Never refuses."""
    identity = _read(store)
    then = _current(identity, "machine")
    if then is None:
        write_json(store.paths.identity, {**identity, "machine": here})
        return None
    # a record from before a field existed (e.g. "threads") agrees on that field
    if all(then.get(k, v) == v for k, v in here.items()):
        return None
    _record_change(store, identity, "machine", here, state)
    return (f"warning: {store.root} computed on another machine until now ({_described(then)}; "
            f"here {_described(here)}): the rounds it adds are a valid draw of the same "
            "procedure, not the bytes one machine would give (recorded in "
            f"{store.paths.identity.name})")


def check_weights(store: RunStore, fingerprint: str, state: dict) -> str | None:
    """Record `fingerprint` (`starlora.models.model_fingerprint` of the base model's weights
    as loaded) in a run that has none yet; on a resume with other weights (a Hub id's default
    branch moved on, a folder retrained or copied anew, a tiny model under other library
    versions), record the change with the `state` it resumed from (``weights_changes``) and
    return a warning to print. Never refuses: a folder's fingerprint reads file times, so a
    copy of the same weights differs too. A model without a fingerprint is not checked."""
    if not fingerprint:
        return None
    identity = _read(store)
    then = _current(identity, "weights")
    if then is None:
        write_json(store.paths.identity, {**identity, "weights": fingerprint})
        return None
    if then == fingerprint:
        return None
    _record_change(store, identity, "weights", fingerprint, state)
    return (f"warning: {store.root}: the base model's weights are not the ones it computed "
            f"with until now ({store.config.model.name}: {then[:24]}... -> "
            f"{fingerprint[:24]}...; a Hub id's new commit, or a folder written anew): the "
            "rounds it adds start from these (recorded in "
            f"{store.paths.identity.name}; model.revision pins a Hub id)")


def _described(machine: dict[str, Any]) -> str:
    threads = f", {machine['threads']} threads" if "threads" in machine else ""
    return (f"{machine['name']}, {machine['device']}, "
            f"{' '.join(machine['flags']) or 'no flags'}{threads}")


def require_precision(store: RunStore, config: ExperimentConfig, model: Any) -> None:
    """Refuse (ConfigError) to compute on a finished run's adapter in another precision than
    the run's: `model` as loaded resolves `resolved_precision` differently from the run's
    last recorded precision (``starlora uncertainty`` and ``starlora calibrate`` load the
    model again, possibly on other hardware, where ``auto`` resolves otherwise). A run with no
    recorded precision (legacy) is not checked."""
    current = _current(_read(store), "precision")
    changed = current and _changes(current, resolved_precision(config, model))
    if changed:
        raise ConfigError(
            f"{store.paths.identity}: the run computed in another precision than this machine "
            f"resolves ({'; '.join(changed)}); run this where it resolves as the run did, or "
            "set model.dtype / scoring.dtype / training.mixed_precision explicitly in the "
            "run's config.yaml")


def _current(identity: dict, key: str) -> Any:
    """What the run's `key` (``precision``, ``machine``, ``weights``) is now: the last change's
    (``<key>_changes``), else the first recorded one (None if none)."""
    return identity.get(f"{key}_changes", [{}])[-1].get(key, identity.get(key))


def _record_change(store: RunStore, identity: dict, key: str, value: Any, state: dict) -> None:
    """Append to ``<key>_changes`` that the run goes on with `value` from `state` (its round
    and the last phase done in it)."""
    changes = [*identity.get(f"{key}_changes", []),
               {"round": state["round"], "after_phase": state["phase"], key: value}]
    write_json(store.paths.identity, {**identity, f"{key}_changes": changes})


def _changes(then: dict[str, str], now: dict[str, str]) -> list[str]:
    return [f"{k}: {then.get(k)} -> {now[k]}" for k in PRECISION_KEYS if then.get(k) != now[k]]
