"""`starlora calibrate`: one temperature fitted on a tiny run's labelled answers, the test
set's signals before and after, rounds/<k>/calibration.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from starlora.cli import main
from starlora.config import load_config
from starlora.errors import StarloraError
from starlora.run.calibrate import calibrate
from starlora.run.loop import run_experiment

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


@pytest.mark.slow
def test_calibrate_a_tiny_run(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_experiment(load_config(TINY), run_dir, progress=False)
    assert main(["calibrate", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "round 1: temperature " in out and "msp:" in out and "ece " in out
    result = json.loads((run_dir / "rounds/1/calibration.json").read_text())
    assert result["round"] == 1 and result["labelled"] == 16 and result["tokens"] > 16
    assert 0.05 <= result["temperature"] <= 20
    # the fitted temperature can only lower the NLL of the answers it was fitted on
    assert result["nll_fitted"] <= result["nll_t1"] + 1e-9
    assert set(result["signals"]) == {"answer", "msp", "perplexity"}
    for found in result["signals"].values():
        assert set(found) == {"before", "after"}
        assert set(found["before"]) >= {"ece", "ece-adaptive", "brier", "rcc-auc", "roc-auc"}
    again = calibrate(str(run_dir), progress=False)  # deterministic
    assert again["temperature"] == pytest.approx(result["temperature"], rel=1e-9)
    # without the last adapter there is nothing to calibrate
    for f in (run_dir / "rounds/1/adapter").iterdir():
        f.unlink()
    with pytest.raises(StarloraError, match="adapter is gone"):
        calibrate(str(run_dir), progress=False)


def test_calibrate_a_choice_run(tmp_path, data_dir):
    """A choice task: the confidence is the predicted choice's probability, a softmax over
    the choices' summed log-probabilities; at T = 1 that is the run's own evaluation's."""
    import numpy as np

    obqa = data_dir / "obqa"
    cfg = load_config(TINY, ["task.name=obqa", f"task.train={obqa / 'train.jsonl'}",
                             f"task.test={obqa / 'test.jsonl'}", "task.pool_size=24",
                             "task.test_size=10", "active_learning.rounds=1",
                             "evaluation.mode=choice"])
    run_dir = tmp_path / "run"
    run_experiment(cfg, run_dir, progress=False)
    result = calibrate(str(run_dir), progress=False)
    assert set(result["signals"]) == {"answer"} and result["labelled"] == 8
    predictions = [json.loads(line) for line in
                   (run_dir / f"rounds/{result['round']}/predictions.jsonl").open()]
    conf, correct = [], []
    for p in predictions:
        ll = np.array(p["choice_logprobs"], dtype=np.float64)
        probs = np.exp(ll - ll.max()) / np.exp(ll - ll.max()).sum()
        conf.append(probs.max())
        correct.append(float(p["correct"]))
    brier = float(np.mean((np.array(conf) - np.array(correct)) ** 2))
    assert result["signals"]["answer"]["before"]["brier"] == pytest.approx(brier, abs=1e-5)


@pytest.mark.slow
def test_calibrate_cuts_as_the_run_cut(tmp_path, monkeypatch):
    """The labelled pairs are cut to ``training.max_length`` as training cut them, and each
    test prompt as evaluation cut it before generating (the signals are then those of the
    answer the model gave to that prompt); calibration used to score them whole."""
    import starlora.run.calibrate as calibrate_module
    from starlora.models import load_model
    from starlora.run.data import load_data, make_task

    run_dir = tmp_path / "run"
    config = load_config(TINY, ["training.max_length=12", "active_learning.rounds=1"])
    run_experiment(config, run_dir, progress=False)
    seen = []
    real = calibrate_module._map_pairs
    monkeypatch.setattr(calibrate_module, "_map_pairs", lambda model, pairs, fn, **kw:
                        seen.append(pairs) or real(model, pairs, fn, **kw))
    calibrate(str(run_dir), progress=False)
    labelled, _, generated = seen  # the fit's two passes, then the test set's signals
    assert all(len(p) + len(a) <= 12 for p, a in labelled)
    tok, task = load_model("tiny-llama").tokenizer, make_task(config.task)
    test = load_data(config.task, task).test
    cut = sorted(task.prompt_ids(tok, ex, 12) for ex in test)
    assert max(len(task.prompt_ids(tok, ex)) for ex in test) > 12  # there was a cut to make
    assert sorted(p for p, _ in generated) == cut
