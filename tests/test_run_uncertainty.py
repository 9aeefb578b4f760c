"""`starlora uncertainty` end to end: a tiny run, then its test items scored after the last
round with the kept adapter."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from starlora.adapters import load_adapter
from starlora.cli import main
from starlora.config import dump_config, load_config
from starlora.errors import StarloraError
from starlora.io import read_jsonl, write_json, write_jsonl
from starlora.models import load_model
from starlora.run.data import load_data, make_task
from starlora.run.loop import run_experiment
from starlora.run.uncertainty import COLUMNS, write_test_uncertainty
from starlora.scoring import score_examples
from starlora.scoring.options import resolve_dtype

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
#: one round (train and evaluate, no pool scoring) on 12 test items: the cheapest finished run
ONE_ROUND = ["active_learning.rounds=1"]


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A finished one-round run of configs/tiny.yaml and the outcome of scoring its test."""
    run_dir = tmp_path_factory.mktemp("unc") / "run"
    run_experiment(load_config(TINY, ONE_ROUND), run_dir, progress=False)
    return run_dir, write_test_uncertainty(run_dir, progress=False)


@pytest.mark.slow
def test_the_test_items_are_scored_after_the_last_round(scored) -> None:
    run_dir, outcome = scored
    assert outcome.written and outcome.round == 0
    assert outcome.path == run_dir / "rounds" / "0" / "test_uncertainty.jsonl"
    rows = read_jsonl(outcome.path)
    predictions = read_jsonl(run_dir / "rounds" / "0" / "predictions.jsonl")
    assert [r["id"] for r in rows] == [p["id"] for p in predictions] and len(rows) == 12
    assert [r["correct"] for r in rows] == [p["correct"] for p in predictions]
    for row in rows:
        assert list(row) == ["id", "correct", *COLUMNS]
        assert all(isinstance(row[c], float) and row[c] >= 0 for c in COLUMNS)
    # lora.dropout 0.1, mc_passes 2: the MC mean is not the deterministic pass
    for m in ("pe_gold", "me_gold", "pe_own", "me_own"):
        assert any(r[f"{m}_1"] != r[f"{m}_mc"] for r in rows), m

    # pe_gold_1 is what an independent score_examples call gives with the kept adapter
    cfg = load_config(run_dir / "config.yaml")
    task = make_task(cfg.task)
    test = load_data(cfg.task, task).test
    loaded = load_model(cfg.model.name, device=cfg.model.device, dtype=cfg.model.dtype)
    model = load_adapter(loaded.model, run_dir / "rounds" / "0" / "adapter")
    dtype = resolve_dtype(cfg.scoring.dtype, next(model.parameters()).device)
    scores = score_examples(model, loaded.tokenizer, task, test, mc_passes=1, dtype=dtype,
                            max_length=cfg.training.max_length, progress=False)
    assert scores.ids == [r["id"] for r in rows]
    np.testing.assert_allclose([r["pe_gold_1"] for r in rows], scores.pe, rtol=1e-6)
    np.testing.assert_allclose([r["me_gold_1"] for r in rows], scores.me, rtol=1e-6)


@pytest.mark.slow
def test_a_second_call_skips_and_a_missing_adapter_is_an_error(scored, tmp_path, capsys) -> None:
    run_dir, outcome = scored
    before = outcome.path.read_bytes()
    again = write_test_uncertainty(run_dir, progress=False)
    assert not again.written and again.path == outcome.path
    assert main(["uncertainty", str(run_dir)]) == 0
    assert f"skipped {run_dir}: {outcome.path} exists" in capsys.readouterr().out
    assert outcome.path.read_bytes() == before

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "rounds" / "0" / "test_uncertainty.jsonl").unlink()
    shutil.rmtree(copy / "rounds" / "0" / "adapter")
    assert main(["uncertainty", str(copy)]) == 2
    assert "the last round's adapter is gone" in capsys.readouterr().err


def test_unfinished_runs_and_other_test_sets_are_refused_before_any_model_loads(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "rounds" / "0" / "adapter").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(load_config(TINY, ONE_ROUND)))
    write_json(run_dir / "state.json", {"round": 0, "phase": "train"})
    with pytest.raises(StarloraError, match="not finished"):
        write_test_uncertainty(run_dir)
    write_json(run_dir / "state.json", {"round": 0, "phase": "evaluate", "finished": True})
    write_json(run_dir / "rounds" / "0" / "adapter" / "adapter_config.json", {})
    with pytest.raises(StarloraError, match="predictions.jsonl: missing"):
        write_test_uncertainty(run_dir)
    write_jsonl(run_dir / "rounds" / "0" / "predictions.jsonl",
                [{"id": f"other-{i}", "gold": "1", "correct": True} for i in range(12)])
    with pytest.raises(StarloraError, match="not the one round 0 was evaluated on"):
        write_test_uncertainty(run_dir)


def test_every_process_follows_the_main_process_on_an_existing_file(tmp_path, monkeypatch):
    """Issue 36, bug 6: each process checked for the output file itself, so one that looked
    after the main process wrote it went another way. Here the main process (a patched
    `on_main`) sees the file, this process does not: it must skip as the main one does."""
    from starlora import distributed as dist

    run_dir = tmp_path / "run"
    (run_dir / "rounds" / "0").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(load_config(TINY, ONE_ROUND)))
    write_json(run_dir / "state.json", {"round": 0, "phase": "evaluate", "finished": True})
    out = run_dir / "rounds" / "0" / "test_uncertainty.jsonl"

    def main_sees_the_file(fn):
        out.write_text("")
        try:
            return fn()
        finally:
            out.unlink()

    monkeypatch.setattr(dist, "on_main", main_sees_the_file)
    outcome = write_test_uncertainty(run_dir)  # no adapter, no predictions: never looked at
    assert not outcome.written and outcome.path == out and not out.exists()
