"""Uncertainty of the test answers after a run's last round: the study's secondary endpoint.

For a finished run, `write_test_uncertainty` loads the base model and the last round's adapter
(``rounds/<last>/adapter``, which ``output.keep_adapters: last`` keeps), rebuilds the test split
from the run's ``config.yaml`` exactly as the run did (`starlora.run.data`), and scores every
test item with the adapted model, writing ``rounds/<last>/test_uncertainty.jsonl``:

    {"id", "correct", "pe_gold_1", "pe_gold_mc", "me_gold_1", "me_gold_mc",
     "pe_own_1", "pe_own_mc", "me_own_1", "me_own_mc"}

* ``correct``: from that round's ``predictions.jsonl`` (the run's own evaluation);
* ``gold``: PE/ME of the gold answer, teacher-forced (`score_examples`);
* ``own``: PE/ME of the adapted model's own greedy answer (`score_own_answers`, up to
  ``scoring.max_new_tokens`` or ``evaluation.max_new_tokens`` tokens); the answer is generated
  once and scored both ways;
* ``_1``: one deterministic pass (no dropout); ``_mc``: the mean over ``scoring.mc_passes``
  MC-dropout passes (3 when the run's is 1), masks seeded by
  ``phase_seed(seed, last round, "score")`` (the last round scores no pool, so that stream is
  otherwise unused). With LoRA dropout 0 the MC passes repeat the single one.

Under N processes (``torchrun``/``accelerate launch``) each scores a length-balanced share
of the test items (`starlora.distributed.map_shards`) and the main process writes the file.
Scoring follows the run's settings: ``scoring.dtype``, ``scoring.model_dropout``, batch sizes,
``training.max_length``. A measure that could not be computed is ``null``. The file is written
atomically; one that exists is kept (the function says so and returns).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlora import distributed as dist
from starlora.errors import StarloraError
from starlora.io import read_jsonl, write_jsonl
from starlora.run.data import load_data, make_task
from starlora.run.identity import data_hashes, require_precision, verify_data
from starlora.run.protocol import phase_seed
from starlora.run.store import RunStore
from starlora.tasks import Example

#: the columns of the file besides id and correct, in order
COLUMNS = tuple(f"{m}_{a}_{p}" for a in ("gold", "own") for m in ("pe", "me")
                for p in ("1", "mc"))
#: MC passes when the run's ``scoring.mc_passes`` is 1
DEFAULT_MC_PASSES = 3


@dataclass
class Outcome:
    """What `write_test_uncertainty` did: `path` of the file, `written` False when it existed."""

    path: Path
    round: int
    written: bool
    n: int = 0


def last_round(store: RunStore) -> int:
    """The last round of a finished run (StarloraError when it is not finished)."""
    state = store.state()
    if not state.get("finished"):
        raise StarloraError(f"{store.root}: the run is not finished (state: round "
                            f"{state['round']}, phase {state['phase']}); finish it first")
    return int(state["round"])


def uncertainty_path(run_dir: str | Path) -> Path:
    """``rounds/<last>/test_uncertainty.jsonl`` of a finished run."""
    store = RunStore.open(run_dir)
    return store.paths.test_uncertainty(last_round(store))


def _number(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def write_test_uncertainty(run_dir: str | Path, *, progress: bool = True,
                           models: dict[tuple, Any] | None = None) -> Outcome:
    """Score a finished run's test items after its last round (see the module docstring).

    `models` keeps loaded base models between calls (keyed by the model settings), so several
    runs of one model load it once; the adapter is removed again before returning."""
    store = RunStore.open(run_dir)
    cfg = store.config
    task = make_task(cfg.task)
    # the main process reads the run directory and decides once; every process follows
    # (another process reading the files itself could see the output appear and go another way)
    k, done, correct = dist.on_main(lambda: _check(store, task))
    path = store.paths.test_uncertainty(k)
    if done:
        return Outcome(path, k, written=False)
    test = load_data(cfg.task, task).test
    adapter = store.adapter_dir(k)

    loaded = _base_model(cfg, models)
    require_precision(store, cfg, loaded.model)
    from starlora.adapters import load_adapter, remove_adapter
    from starlora.scoring import score_examples, score_own_answers
    from starlora.scoring.options import resolve_dtype

    model = load_adapter(loaded.model, adapter)
    tok = loaded.tokenizer
    try:
        sc = cfg.scoring
        mc = sc.mc_passes if sc.mc_passes > 1 else DEFAULT_MC_PASSES
        options = dict(measures=("pe", "me"), model_dropout=sc.model_dropout,
                       batch_size=sc.batch_size, max_tokens_per_batch=sc.max_tokens_per_batch,
                       max_length=cfg.training.max_length,
                       dtype=resolve_dtype(sc.dtype, next(model.parameters()).device,
                                           next(model.parameters()).dtype),
                       seed=phase_seed(cfg.seed, k, "score"),
                       progress=progress and dist.is_main())

        def share_rows(share: list[Example]) -> list[dict[str, Any]]:
            """The columns of `share`'s rows: this process's share of the test items."""
            scores = {
                "gold_1": score_examples(model, tok, task, share, mc_passes=1,
                                         desc="scoring test (gold answers, 1 pass)", **options),
                "gold_mc": score_examples(model, tok, task, share, mc_passes=mc,
                                          desc=f"scoring test (gold answers, {mc} passes)",
                                          **options),
            }
            scores["own_mc"], out = score_own_answers(
                model, tok, task, share,
                max_new_tokens=sc.max_new_tokens or cfg.evaluation.max_new_tokens,
                generation_batch_size=cfg.evaluation.batch_size, mc_passes=mc,
                while_generating=False,  # the same bytes with any number of processes
                generation_desc="generating test answers (adapter)",
                desc=f"scoring test (own answers, {mc} passes)", **options)
            scores["own_1"] = score_examples(model, tok, task, share, answer_ids=out.tokens,
                                             mc_passes=1,
                                             desc="scoring test (own answers, 1 pass)",
                                             **options)
            return [{column: _number(getattr(scores[column.split("_", 1)[1]],
                                             column.split("_", 1)[0])[i])
                     for column in COLUMNS} for i in range(len(share))]

        def lengths() -> list[int]:  # prompt tokens: own answers are generated
            return [len(task.prompt_ids(tok, ex, cfg.training.max_length)) for ex in test]

        columns = dist.map_shards(share_rows, test, lengths)  # on the main process
    finally:
        loaded.model = remove_adapter(model)
    if columns is None:  # another process writes
        return Outcome(path, k, written=False)
    rows = [{"id": ex.id, "correct": correct[ex.id], **cols} for ex, cols in zip(test, columns)]
    write_jsonl(path, rows)
    return Outcome(path, k, written=True, n=len(rows))


def _check(store: RunStore, task: Any) -> tuple[int, bool, dict[str, bool]]:
    """(the last round k, whether its file exists already, {test id: correct}) of a finished
    run whose round k can be scored; StarloraError when it cannot (adapter or predictions
    missing, another test set)."""
    k = last_round(store)
    if store.paths.test_uncertainty(k).is_file():
        return k, True, {}
    adapter = store.adapter_dir(k)
    if not store.has_adapter(k):
        raise StarloraError(f"{adapter}: the last round's adapter is gone (deleted, or the run "
                            "kept none); its test uncertainty cannot be computed")
    predictions = read_jsonl(store.paths.round_file(k, "predictions.jsonl"))
    if not predictions:
        raise StarloraError(f"{store.paths.round_file(k, 'predictions.jsonl')}: missing or "
                            "empty; the round's evaluation is needed for `correct`")
    test = load_data(store.config.task, task).test
    verify_data(store, data_hashes(store.config, [], test, []), ("test",))
    correct = {str(p["id"]): bool(p["correct"]) for p in predictions}
    gold = {str(p["id"]): p.get("gold") for p in predictions}
    if sorted(correct) != sorted(ex.id for ex in test) or any(
            gold[ex.id] != task.gold(ex.answer) for ex in test):
        raise StarloraError(f"{store.root}: the test set rebuilt from config.yaml is not the "
                            f"one round {k} was evaluated on (predictions.jsonl ids or gold "
                            "answers differ)")
    return k, False, correct


def _base_model(cfg: Any, models: dict[tuple, Any] | None) -> Any:
    from starlora.models import load_model

    m = cfg.model
    key = tuple(m.model_dump().values())
    if models is not None and key in models:
        return models[key]
    print(f"[starlora] loading {m.name}", file=sys.stderr, flush=True)
    loaded = load_model(**m.model_dump())
    if models is not None:
        models[key] = loaded
    return loaded
