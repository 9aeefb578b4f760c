"""Confidence metrics (`starlora.confidence`) on hand-computed examples."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from starlora.confidence import (
    adaptive_ece,
    aurc,
    auroc,
    best_on_grid,
    brier,
    exact_match,
    expected_calibration_error,
    fit_temperature,
    gold_nll,
    kappa,
    risk_coverage,
    selective_accuracy,
    signal_metrics,
    temperature_grid,
)


def test_auroc_counts_a_tie_between_a_right_and_a_wrong_answer_as_half():
    # right: 0.9, 0.8; wrong: 0.8, 0.3. Pairs: 0.9>0.8, 0.9>0.3, 0.8=0.8 (1/2), 0.8>0.3
    assert auroc([0.9, 0.8, 0.8, 0.3], [1, 1, 0, 0]) == pytest.approx(3.5 / 4)
    assert auroc([0.5, 0.5, 0.5], [1, 0, 1]) == pytest.approx(0.5)
    assert np.isnan(auroc([0.2, 0.4], [1, 1]))


def test_aurc_of_a_known_ranking():
    # most confident first: right, wrong, right, wrong -> risks 0, 1/2, 1/3, 2/4
    conf, correct = [0.1, 0.5, 0.7, 0.9], [0, 1, 0, 1]
    assert aurc(conf, correct) == pytest.approx((0 + 1 / 2 + 1 / 3 + 2 / 4) / 4)
    coverage, risk = risk_coverage(conf, correct)
    assert coverage.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert risk == pytest.approx([0, 1 / 2, 1 / 3, 1 / 2])
    # a perfect ranking: the two right answers first
    assert aurc([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0]) == pytest.approx((0 + 0 + 1 / 3 + 2 / 4) / 4)


def test_tied_confidences_average_over_their_orders():
    # a constant signal cannot rank: the risk is the error rate at every coverage, any order
    for correct in ([1, 0, 1, 0], [0, 0, 1, 1]):
        assert aurc([0.7] * 4, correct) == pytest.approx(0.5)
        assert selective_accuracy([0.7] * 4, correct, 0.5) == pytest.approx(0.5)
    # ties inside: top 0.9 (right), then 0.5 x2 (one right, one wrong): expected 0.5 errors each
    assert risk_coverage([0.5, 0.9, 0.5], [0, 1, 1])[1] == pytest.approx([0, 0.25, 1 / 3])


def test_selective_accuracy_takes_the_ceiling_of_coverage_times_n():
    conf, correct = [0.9, 0.8, 0.7, 0.6, 0.5], [1, 1, 0, 1, 0]
    assert selective_accuracy(conf, correct, 0.5) == pytest.approx(2 / 3)  # ceil(2.5) = 3
    assert selective_accuracy(conf, correct, 0.8) == pytest.approx(3 / 4)  # 4 items
    assert selective_accuracy(conf, correct, 1.0) == pytest.approx(3 / 5)


def test_brier_by_hand():
    assert brier([0.9, 0.2], [1, 1]) == pytest.approx((0.01 + 0.64) / 2)
    assert brier([1.0, 0.0], [1, 0]) == 0.0


def test_adaptive_ece_on_six_items():
    conf = [0.6, 0.1, 0.9, 0.4, 0.2, 0.8]
    correct = [1, 0, 1, 0, 1, 1]
    # sorted: (0.1, 0) (0.2, 1) | (0.4, 0) (0.6, 1) | (0.8, 1) (0.9, 1); 3 bins of 2
    # |0.5 - 0.15| + |0.5 - 0.5| + |1 - 0.85|, each weighted 2/6 -> 0.5 / 3
    ece, bins = adaptive_ece(conf, correct, n_bins=3)
    assert ece == pytest.approx(0.5 / 3)
    assert [b["count"] for b in bins] == [2, 2, 2]
    assert [(b["lower"], b["upper"]) for b in bins] == [(0.1, 0.2), (0.4, 0.6), (0.8, 0.9)]
    # equal-width with 3 bins: (0, 1/3]: 0.1, 0.2 -> same; (1/3, 2/3]: 0.4, 0.6; (2/3, 1]
    assert expected_calibration_error(conf, correct, 3)[0] == pytest.approx(0.5 / 3)
    # 4 bins for 6 items: sizes 2, 2, 1, 1
    assert [b["count"] for b in adaptive_ece(conf, correct, 4)[1]] == [2, 2, 1, 1]


def test_adaptive_ece_sees_what_one_crowded_equal_width_bin_hides():
    # everything at 0.95-0.98, half of it right: equal-width bins put it all in one bin,
    # equal-mass bins separate the right (more confident) answers from the wrong ones
    conf = [0.95, 0.96, 0.97, 0.98]
    correct = [0, 0, 1, 1]
    assert expected_calibration_error(conf, correct, 10)[0] == pytest.approx(0.465)
    assert adaptive_ece(conf, correct, 2)[0] == pytest.approx((0.955 + (1 - 0.975)) / 2)


def test_kappa_by_hand_and_against_scikit_learn():
    a, b = ["A", "A", "B", "B"], ["A", "B", "B", "B"]
    # p_o = 3/4; p_e = .5 * .25 + .5 * .75 = .5 -> (0.75 - 0.5) / 0.5
    assert kappa(a, b) == pytest.approx(0.5)
    assert kappa(a, b) == pytest.approx(cohen_kappa_score(a, b))
    assert kappa(["7", None, "3"], ["7", None, "3"]) == 1.0
    assert kappa(["1", "1"], ["1", "1"]) == 1.0  # one label everywhere: full agreement
    assert kappa(["A", "B"], ["B", "A"]) == pytest.approx(-1.0)
    assert exact_match(["7", None, "3"], ["7", None, "4"]) == pytest.approx(2 / 3)


def test_signal_metrics_names():
    got = signal_metrics([0.1, 0.5, 0.7, 0.9], [0, 1, 0, 1], n_bins=2)
    assert list(got) == ["roc-auc", "rcc-auc", "sel-acc@50", "sel-acc@80", "brier", "ece",
                         "ece-adaptive"]
    assert got["roc-auc"] == pytest.approx(0.75)


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_temperature_fit_recovers_a_known_temperature(true_t):
    rng = np.random.default_rng(1234)
    logits = rng.normal(0.0, 3.0, size=(4000, 12))
    z = logits / true_t
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    targets = np.array([rng.choice(12, p=row) for row in p])
    fitted = fit_temperature(logits, targets)
    assert fitted == pytest.approx(true_t, rel=0.05)
    # the grid search `starlora calibrate` uses (NLL summed batch by batch on a fixed grid)
    grid = temperature_grid()
    on_grid = best_on_grid(grid, [gold_nll(logits, targets, t) for t in grid])
    assert on_grid == pytest.approx(true_t, rel=0.05)
    assert on_grid == pytest.approx(fitted, rel=0.01)
