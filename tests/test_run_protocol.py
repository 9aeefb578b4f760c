"""A run's identity: protocol id, the settings that may change on resume, random streams."""

from __future__ import annotations

import numpy as np
import pytest

from starlora.config import flatten_config, load_config
from starlora.errors import ConfigError
from starlora.run.protocol import (
    EXTENDABLE,
    RESULT_NEUTRAL,
    STREAMS,
    identity,
    phase_seed,
    protocol_id,
    result_changes,
    stream,
)


def test_protocol_id_names_the_comparison_not_the_arm_or_its_length() -> None:
    base = load_config()
    same = ["active_learning.rounds=12", "active_learning.budget=3000", "seed=4",
            "active_learning.strategy=random", "scoring.batch_size=4", "model.device=cpu"]
    for override in same:
        assert protocol_id(load_config(None, [override])) == protocol_id(base), override
    for override in ["training.lr=1e-3", "lora.r=8", "active_learning.query_size=100",
                     "scoring.mc_passes=3", "task.subset_seed=1"]:
        assert protocol_id(load_config(None, [override])) != protocol_id(base), override


def test_one_list_of_settings_that_may_change_on_resume() -> None:
    stored = load_config(None, ["active_learning.rounds=4", "active_learning.budget=100"])
    grown = load_config(None, ["active_learning.rounds=6", "active_learning.budget=200",
                               "evaluation.batch_size=2", "output.keep_adapters=last"])
    assert result_changes(stored, grown) == []
    assert result_changes(stored, load_config(None, ["active_learning.rounds=6"])) == []  # no budget
    shrunk = load_config(None, ["active_learning.rounds=3", "active_learning.budget=100"])
    assert result_changes(stored, shrunk) == ["active_learning.rounds"]  # cannot un-run a round
    assert result_changes(stored, load_config(None, ["active_learning.rounds=4", "seed=1",
                                                     "active_learning.budget=100"])) == ["seed"]
    assert not RESULT_NEUTRAL & EXTENDABLE
    flat_keys = set(load_config().model_dump(mode="json")["active_learning"])
    assert {k.split(".")[1] for k in EXTENDABLE} <= flat_keys


def test_streams_are_independent_per_seed_round_and_phase() -> None:
    draws = {(s, k, p): stream(s, k, p).random(4).tolist()
             for s in (0, 1) for k in (0, 1, 2) for p in STREAMS}
    assert len({tuple(v) for v in draws.values()}) == len(draws)
    assert stream(3, 2, "select").random(4).tolist() == stream(3, 2, "select").random(4).tolist()
    seeds = {phase_seed(s, k, p) for s in (0, 1) for k in range(3) for p in STREAMS}
    assert len(seeds) == 2 * 3 * len(STREAMS) and all(0 <= x < 2**32 for x in seeds)
    np.random.seed(phase_seed(0, 0, "train"))  # accelerate's set_seed seeds NumPy's legacy RNG
    with pytest.raises(KeyError, match="unknown random stream"):
        stream(0, 0, "evaluate-typo")


def test_settings_added_later_keep_the_ids_of_runs_made_before_them() -> None:
    """A committed run's stored protocol id is what its config.yaml gives today: settings added
    after it (diversity, evaluation.samples, the stop set) count only away from their
    defaults, and the stopping rule never counts (it decides how many rounds, not what)."""
    import json
    from pathlib import Path

    run = Path(__file__).resolve().parents[1] / "results/arith-study/runs/pe-dynamic/seed0"
    stored = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["protocol"]
    assert protocol_id(load_config(run / "config.yaml", stored=True)) == stored
    base = load_config()
    for override in ["active_learning.stop_when=agreement >= 0.9 for 2 rounds",
                     "evaluation.samples=0", "active_learning.diversity=none", "training.steps=null"]:
        assert protocol_id(load_config(None, [override])) == protocol_id(base), override
    for override in ["evaluation.samples=5", "active_learning.stop_set=100",
                     "active_learning.diversity=kmeans", "training.steps=30"]:
        assert protocol_id(load_config(None, [override])) != protocol_id(base), override
    ruled = load_config(None, ["active_learning.stop_when=uncertainty < 0.2"])
    assert result_changes(ruled, base) == [] and result_changes(base, ruled) == []
    assert STREAMS["stop_set"] not in {v for k, v in STREAMS.items() if k != "stop_set"}


def test_a_stored_config_that_lacks_a_later_setting_means_the_value_runs_had_before_it(
    tmp_path,
) -> None:
    """`scoring.base_scores` came after the first study, whose runs scored the base term on
    the base model's own answers (``own``); its default is now ``adapted``. An old run's
    config.yaml, which does not name it, still reads as ``own`` (the run resumes and reports
    as it ran) and keeps its protocol id, and a user config that takes the new default is
    refused on resume instead of silently switching the run's procedure."""
    from starlora.config import dump_config
    from starlora.run.store import RunStore

    assert load_config().scoring.base_scores == "adapted"  # today's default
    run_dir = tmp_path / "old-run"
    run_dir.mkdir()
    old = dump_config(load_config(None, ["scoring.base_scores=own"]))
    old = old.replace("  base_scores: own\n", "")
    assert "base_scores" not in old
    (run_dir / "config.yaml").write_text(old)
    assert load_config(run_dir / "config.yaml").scoring.base_scores == "adapted"  # a user's file
    stored = load_config(run_dir / "config.yaml", stored=True)
    assert stored.scoring.base_scores == "own"
    assert RunStore.open(run_dir).config.scoring.base_scores == "own"
    # the old run keeps the id it had, the one of runs made since at the same value ...
    assert protocol_id(stored) == protocol_id(load_config(None, ["scoring.base_scores=own"]))
    assert protocol_id(stored) != protocol_id(load_config())  # ... not today's default's
    assert "scoring.base_scores" not in identity(flatten_config(stored))  # left out, as before
    assert identity(flatten_config(load_config()))["scoring.base_scores"] == "adapted"
    with pytest.raises(ConfigError, match="scoring.base_scores") as refused:
        RunStore.create_or_resume(run_dir, load_config())
    assert f"starlora run --run-dir {run_dir}" in str(refused.value)  # the way that resumes
    # named in the file, a value stands as written
    (run_dir / "config.yaml").write_text(dump_config(load_config()))
    assert load_config(run_dir / "config.yaml", stored=True).scoring.base_scores == "adapted"
