"""Label-free stopping: the rule's grammar and decision, the stop-set signals, and a tiny run
that ends early by the rule and goes on when the rule is lifted."""

from __future__ import annotations

from pathlib import Path

import pytest

from starlora.config import load_config
from starlora.errors import ConfigError
from starlora.io import read_jsonl
from starlora.stopping import StopRule, parse_rule, stop_index, stop_signals

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def test_rules_parse_and_bad_ones_are_config_errors():
    assert parse_rule("none") is None
    assert parse_rule("agreement >= 0.95 for 2 rounds") == StopRule("agreement", ">=", 0.95, 2)
    assert parse_rule("uncertainty<0.1") == StopRule("uncertainty", "<", 0.1, 1)
    assert parse_rule("agreement > 1e-1 for 1 round").threshold == pytest.approx(0.1)
    for bad in ["agreement = 0.9", "accuracy >= 0.9", "agreement >= 0.9 for 0 rounds", ""]:
        with pytest.raises(ValueError, match="is not a stopping rule"):
            parse_rule(bad)
    with pytest.raises(ConfigError, match="active_learning.stop_when"):
        load_config(None, ["active_learning.stop_when=agreement >= high"])


def test_the_rule_stops_at_the_first_round_it_has_held_for_n_rounds():
    rule = parse_rule("agreement >= 0.9 for 2 rounds")
    assert stop_index(rule, [None, 0.95, 0.8, 0.91, 0.93, 0.99]) == 4
    assert stop_index(rule, [None, 0.95, 0.8, 0.91]) is None
    assert stop_index(None, [None, 1.0, 1.0]) is None
    assert stop_index(parse_rule("uncertainty <= 0.2"), [0.5, 0.3, 0.2]) == 2


def test_stop_signals_exact_match_for_open_answers_kappa_for_choices():
    import math

    before = [{"id": "a", "prediction": "3"}, {"id": "b", "prediction": "4"},
              {"id": "c", "prediction": None}]
    now = [{"id": "c", "prediction": None, "logprob_mean": math.log(0.5)},
           {"id": "a", "prediction": "3", "logprob_mean": math.log(0.9)},
           {"id": "b", "prediction": "5", "logprob_mean": math.log(0.7)}]
    got = stop_signals(before, now, choice=False)
    assert got["stop_agreement"] == pytest.approx(2 / 3)
    assert got["stop_uncertainty"] == pytest.approx(1 - (0.5 + 0.9 + 0.7) / 3)
    assert stop_signals(None, now, choice=False)["stop_agreement"] is None
    prev = [{"id": i, "prediction": p} for i, p in zip("abcd", "AABB")]
    cur = [{"id": i, "prediction": p, "confidence": 0.5} for i, p in zip("abcd", "ABBB")]
    got = stop_signals(prev, cur, choice=True)
    assert got["stop_agreement"] == pytest.approx(0.5)  # kappa: p_o 3/4, p_e 1/2
    assert got["stop_uncertainty"] == pytest.approx(0.5)


def test_stop_when_needs_a_stop_set(tmp_path):
    from starlora.run.loop import run_experiment

    cfg = load_config(TINY, ["active_learning.stop_when=agreement >= 0.9"])
    with pytest.raises(ConfigError, match="active_learning.stop_set"):
        run_experiment(cfg, tmp_path / "run", progress=False)


@pytest.mark.slow
def test_a_tiny_run_ends_by_the_rule_and_goes_on_without_it(tmp_path, capsys):
    from starlora.run.loop import run_experiment
    from starlora.run.store import RunStore

    run_dir = tmp_path / "run"
    ruled = ["active_learning.rounds=3", "active_learning.stop_set=6",
             "active_learning.stop_when=agreement >= 0 for 1 rounds", "evaluation.samples=2"]
    store = run_experiment(load_config(TINY, ruled), run_dir, progress=False)
    metrics = store.metrics()
    assert [m["round"] for m in metrics] == [0, 1]  # round 1 is the first with an agreement
    assert metrics[0]["stop_agreement"] is None and 0 <= metrics[1]["stop_agreement"] <= 1
    assert all(0 <= m["stop_uncertainty"] <= 1 for m in metrics)
    assert set(metrics[1]["signals"]) == {"answer", "msp", "perplexity", "consistency"}
    assert set(metrics[1]["signals"]["answer"]) >= {"roc-auc", "rcc-auc", "sel-acc@50",
                                                     "sel-acc@80", "brier", "ece", "ece-adaptive"}
    stop_ids = {r["id"] for r in read_jsonl(run_dir / "rounds/0/stop.jsonl")}
    assert len(stop_ids) == 6
    assert {r["id"] for r in read_jsonl(run_dir / "rounds/1/stop.jsonl")} == stop_ids
    assert not stop_ids & {r["id"] for r in store.labelled()}  # never selected or labelled
    assert not stop_ids & {r["id"] for r in read_jsonl(run_dir / "rounds/0/scores.jsonl")}
    preds = read_jsonl(run_dir / "rounds/1/predictions.jsonl")
    assert all(p["consistency"] in (0.0, 0.5, 1.0) and p["tokens"] >= 1 for p in preds)
    state = store.state()
    assert state["finished"] and state["round"] == 1
    assert RunStore.open(run_dir).status()["phase"] == "finished"
    from starlora.cli import main
    from starlora.report import build_report

    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "stopping:   rule agreement >= 0 for 1 rounds (held after round 1)" in out
    assert "round 1: agreement" in out and "perplexity:" in out
    written = build_report([run_dir], tmp_path / "report")
    assert {"stopping.md", "confidence.md", "risk_coverage.png"} <= set(written)
    assert "| consistency |" in written["confidence.md"].read_text()
    before = (run_dir / "metrics.jsonl").read_bytes()
    run_experiment(load_config(TINY, ruled), run_dir, progress=False)  # stays stopped
    assert (run_dir / "metrics.jsonl").read_bytes() == before
    # the rule lifted (stop_when may change on resume): the run goes on where it stopped
    lifted = [*ruled[:-2], "active_learning.stop_when=none", "evaluation.samples=2"]
    store = run_experiment(load_config(TINY, lifted), run_dir, progress=False)
    assert [m["round"] for m in store.metrics()] == [0, 1, 2]
