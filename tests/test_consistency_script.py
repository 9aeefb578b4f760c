"""results/arith-study/consistency.py: a finished run's last adapter retrained from its labels
reproduces the run's greedy answers, the self-consistency signal is measured on it, and the
report's table and paired test are computed from the per-run cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scripts import load_script

from starlora.config import load_config
from starlora.run.loop import run_experiment

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
SCRIPT = "results/arith-study/consistency.py"


def _rows(correct: list[bool], consistency: list[float]) -> list[dict]:
    return [{"id": f"t{i}", "prediction": str(i), "correct": c, "consistency": s,
             "logprob": -1.0 - i, "tokens": 4, "committed_prediction": str(i if i else 99),
             "committed_correct": c, "same_text": i != 0}
            for i, (c, s) in enumerate(zip(correct, consistency))]


def _write(cache: Path, arm: str, seed: int, rows: list[dict]) -> None:
    header = {"header": True, "run": f"{arm}/seed{seed}", "seed": seed, "round": 6,
              "samples": 5, "items": len(rows), "test_items": len(rows),
              "train": {"final_loss": 0.1, "committed_final_loss": 0.1}}
    (cache / f"{arm}-seed{seed}.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in [header, *rows]))


def test_faithfulness_and_the_consistency_numbers_by_hand():
    c = load_script(SCRIPT)
    rows = _rows([True, True, False, False], [1.0, 0.6, 0.6, 0.0])
    f = c.faithfulness(rows)
    assert f == {"same_answer": 0.75, "same_text": 0.75, "accuracy": 0.5,
                 "committed_accuracy": 0.5}
    found = c.signals_of(rows)["consistency"]
    # pairs (right, wrong): (1.0, 0.6) 1, (1.0, 0.0) 1, (0.6, 0.6) 0.5, (0.6, 0.0) 1 -> 3.5 / 4
    assert found["roc-auc"] == pytest.approx(0.875)
    assert found["brier"] == pytest.approx((0 + 0.16 + 0.36 + 0) / 4)
    # equal-width bins: {0.0} acc 0, {0.6, 0.6} acc 0.5 (|0.5 - 0.6| * 2/4), {1.0} acc 1
    assert found["ece"] == pytest.approx(0.05)


def test_report_pairs_the_arms_by_seed(tmp_path):
    c = load_script(SCRIPT)
    for seed in range(3):
        _write(tmp_path, "pe-dynamic", seed, _rows([True, False, True, False],
                                                   [1.0, 0.0, 0.8, 0.2]))
        # the ablation ranks one pair wrong on every seed: a worse AURC each time
        _write(tmp_path, "pe-dynamic-no-constraints", seed,
               _rows([True, False, True, False], [1.0, 0.0, 0.2, 0.8]))
    text = c.report(tmp_path)
    assert "K = 5 answers" in text and "| pe-dynamic/seed2 | 0.750 | 0.750 |" in text
    line = next(x for x in text.splitlines() if x.startswith("| consistency | rcc-auc |"))
    diff = float(line.split("|")[3])
    ours = c.signals_of(_rows([True, False, True, False], [1.0, 0.0, 0.2, 0.8]))
    theirs = c.signals_of(_rows([True, False, True, False], [1.0, 0.0, 0.8, 0.2]))
    assert diff == pytest.approx(ours["consistency"]["rcc-auc"]
                                 - theirs["consistency"]["rcc-auc"], abs=5e-5)
    assert diff > 0
    # three equal positive differences: the exact sign-flip p is 2 / 2**3
    assert line.split("|")[6].strip() == "0.2500"


@pytest.mark.slow
def test_a_retrained_last_adapter_reproduces_the_run(tmp_path):
    """The tiny run keeps its last adapter: the retrained one has the same weights and the
    same greedy answers, and the sampled answers give a share in steps of 1/K."""
    import torch
    from safetensors.torch import load_file

    c = load_script(SCRIPT)
    run_dir = tmp_path / "runs" / "pe-dynamic" / "seed0"
    run_experiment(load_config(TINY), run_dir, progress=False)
    found = c.retrain(run_dir)
    kept = load_file(str(run_dir / "rounds/1/adapter/adapter_model.safetensors"))
    mine = {n: p for n, p in found["model"].named_parameters() if "lora_" in n}
    assert len(kept) == len(mine) > 0
    for name, value in kept.items():
        ours = next(p for n, p in mine.items() if n.replace(".default", "") == name)
        assert torch.equal(ours.detach(), value)
    header, rows = c.evaluate_sampled(found, samples=3)
    assert header["items"] == len(rows) == 12 and header["round"] == 1
    assert all(r["same_text"] for r in rows)
    assert c.faithfulness(rows)["same_answer"] == 1.0
    assert {round(r["consistency"] * 3) / 3 for r in rows} <= {0.0, 1 / 3, 2 / 3, 1.0}
    assert np.isfinite([r["logprob"] for r in rows]).all()
