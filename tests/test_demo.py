"""The demo's wiring (two strategies, then the report) on a tiny model; the real demo runs
SmolLM2 for 10-30 minutes and is checked by hand (its last figures: docs/demo.json)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from starlora.config import load_config
from starlora.demo import DEFAULT_STRATEGY, DEMO_CONFIG, run_demo
from starlora.errors import ConfigError
from starlora.run.store import RunStore

QUICK = ["model.name=tiny-llama", "task.pool_size=24", "task.test_size=6", "lora.r=2",
         "active_learning.initial_size=4", "active_learning.query_size=4",
         "active_learning.rounds=2", "training.epochs=1", "evaluation.max_new_tokens=8"]


def test_demo_config_is_the_embedded_model_offline() -> None:
    config = load_config(DEMO_CONFIG)
    assert config.model.name == "smollm2-135m-instruct" and config.task.name == "arith"
    assert config.task.train is None  # generated data: no download


def test_the_demo_shows_the_default_strategy_against_random() -> None:
    """The default strategy has one owner, the config: the demo file leaves it unset, and the
    demo's second run is whatever the default is."""
    import inspect

    import yaml

    from starlora.config import ExperimentConfig

    assert DEFAULT_STRATEGY == ExperimentConfig().active_learning.strategy != "random"
    assert load_config(DEMO_CONFIG).active_learning.strategy == DEFAULT_STRATEGY
    assert "strategy" not in yaml.safe_load(DEMO_CONFIG.read_text())["active_learning"]
    default = inspect.signature(run_demo).parameters["strategies"].default
    assert default == ("random", DEFAULT_STRATEGY)


def test_the_demo_refuses_a_strategy_it_would_ignore(tmp_path: Path) -> None:
    """--set active_learning.strategy was taken and silently replaced by the demo's own."""
    with pytest.raises(ConfigError, match="--set active_learning.strategy: the demo runs"):
        run_demo(tmp_path / "d", overrides=["active_learning.strategy=pe"])
    assert not (tmp_path / "d").exists()


@pytest.mark.slow
def test_demo_runs_both_strategies_and_writes_the_report(tmp_path: Path, capsys) -> None:
    written = run_demo(tmp_path, overrides=QUICK, progress=False)
    for strategy in ("random", DEFAULT_STRATEGY):
        assert [m["n_labelled"] for m in RunStore.open(tmp_path / "runs" / strategy).metrics()] == [4, 8]
    assert {"accuracy.png", "ece.png", "reliability.png", "summary.md"} <= set(written)
    for path in written.values():
        assert path.is_file() and path.stat().st_size > 0
    assert "accuracy.png" in capsys.readouterr().out
    import json

    record = json.loads((tmp_path / "demo.json").read_text())  # what the README's figures use
    assert record["resumed"] is False and record["minutes"] > 0 and record["cpus"] >= 1
    assert {k: [n for n, _ in v] for k, v in record["accuracy"].items()} == {
        "random": [4, 8], DEFAULT_STRATEGY: [4, 8]}
    run_demo(tmp_path, overrides=QUICK, progress=False)  # again: finished runs, resumed
    assert json.loads((tmp_path / "demo.json").read_text())["resumed"] is True
    # another seed (the docs' "more seeds"; it used to be refused: the folder held seed 0):
    # its runs go beside the first, and the report takes both seeds of each strategy
    run_demo(tmp_path, overrides=[*QUICK, "seed=1"], progress=False)
    assert sorted(d.name for d in (tmp_path / "runs").iterdir()) == sorted(
        [n for s in ("random", DEFAULT_STRATEGY) for n in (s, f"{s}-seed1")])
    summary = list(csv.DictReader((tmp_path / "report" / "summary.csv").open()))
    assert sorted((r["strategy"], r["seeds"]) for r in summary) == sorted(
        [("random", "2"), (DEFAULT_STRATEGY, "2")])
    with pytest.raises(ConfigError, match=r"other settings \(lora.r\).*--out"):
        run_demo(tmp_path, overrides=[*QUICK, "lora.r=4"], progress=False)
