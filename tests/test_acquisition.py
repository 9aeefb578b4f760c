from __future__ import annotations

import numpy as np
import pytest

from starlora.acquisition import STRATEGIES, Dynamic, LambdaSchedule, make_strategy, minmax
from starlora.errors import ConfigError, EmptyPoolError, PoolExhaustedError


def table(n: int, seed: int = 0) -> tuple[list[str], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    ids = [f"x{i}" for i in range(n)]
    cols = {k: rng.gamma(2.0, 3.0, n) for k in ("pe", "me", "pe_base", "me_base")}
    return ids, cols


@pytest.mark.parametrize("name", STRATEGIES)
def test_contract(name: str) -> None:
    """Every strategy: a permutation of the pool, reproducible, typed errors, readable str()."""
    strategy = make_strategy(name, n_queries=4)
    ids, scores = table(50)
    ranked = strategy.rank(ids, scores, query_index=1, rng=np.random.default_rng(3))
    assert sorted(ranked) == sorted(ids)
    assert ranked == strategy.rank(ids, scores, query_index=1, rng=np.random.default_rng(3))
    assert strategy.select(ids, scores, 7, query_index=1, rng=np.random.default_rng(3)) == ranked[:7]
    # only the columns the strategy declares are read
    needed = {k: scores[k] for k in strategy.needs}
    assert strategy.rank(ids, needed, query_index=1, rng=np.random.default_rng(3)) == ranked
    with pytest.raises(EmptyPoolError):
        strategy.rank([], {k: np.zeros(0) for k in scores}, query_index=0, rng=np.random.default_rng())
    with pytest.raises(PoolExhaustedError, match="only 50 remain"):
        strategy.select(ids, scores, 51, query_index=0, rng=np.random.default_rng())
    assert len(strategy.select(ids, scores, 51, query_index=0, rng=np.random.default_rng(),
                               take_rest=True)) == 50
    assert str(strategy).startswith(name)
    if strategy.needs:
        bad = dict(scores, **{strategy.needs[0]: np.full(50, np.nan)})
        with pytest.raises(ValueError, match="NaN"):
            strategy.rank(ids, bad, query_index=0, rng=np.random.default_rng())


def test_uncertainty_and_subtract_order() -> None:
    ids = ["a", "b", "c"]
    scores = {"pe": np.array([1.0, 3.0, 2.0]), "pe_base": np.array([0.0, 2.9, 0.0])}
    rng = np.random.default_rng(0)
    assert make_strategy("pe").rank(ids, scores, query_index=0, rng=rng) == ["b", "c", "a"]
    # subtract: 1.0, 0.1, 2.0
    assert make_strategy("pe-subtract").rank(ids, scores, query_index=0, rng=rng) == ["c", "a", "b"]


def test_ties_are_broken_by_the_seeded_rng() -> None:
    ids = [str(i) for i in range(20)]
    scores = {"me": np.ones(20)}
    orders = {tuple(make_strategy("me").rank(ids, scores, query_index=0,
                                              rng=np.random.default_rng(s))) for s in range(5)}
    assert len(orders) == 5


@pytest.mark.parametrize("kind", ["linear", "cosine", "exponential", "constant"])
def test_lambda_schedule_endpoints(kind: str) -> None:
    schedule = LambdaSchedule(kind, 0.9, 0.1, n_queries=9)
    assert schedule(0) == pytest.approx(0.9)
    assert schedule(8) == pytest.approx(0.9 if kind == "constant" else 0.1)
    values = [schedule(t) for t in range(9)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # never rises
    assert LambdaSchedule(kind, 0.9, 0.1, n_queries=1)(0) == 0.9
    assert LambdaSchedule("linear", 0.9, 0.1, 5)(2) == pytest.approx(0.5)


def test_dynamic_mixing_equals_hand_computation() -> None:
    ids = ["a", "b", "c", "d"]
    scores = {
        "pe": np.array([10.0, 30.0, 20.0, 40.0]),     # minmax -> 0, 2/3, 1/3, 1
        "pe_base": np.array([4.0, 0.0, 2.0, 1.0]),    # minmax -> 1, 0, 0.5, 0.25
    }
    strategy = make_strategy("pe-dynamic", n_queries=5)  # lambda(1) = 0.9 - 0.8/4 = 0.7
    u = strategy.utility(scores, query_index=1)
    expected = 0.7 * np.array([1, 0, 0.5, 0.25]) + 0.3 * np.array([0, 2 / 3, 1 / 3, 1])
    np.testing.assert_allclose(u, expected)  # 0.7, 0.2, 0.45, 0.475
    assert strategy.rank(ids, scores, query_index=1, rng=np.random.default_rng()) == ["a", "d", "c", "b"]
    # the authors' code leaves u_full raw: the raw term (tens of nats) drowns the base term
    raw = Dynamic("pe", LambdaSchedule("linear", 0.9, 0.1, 5), normalize="raw_full")
    np.testing.assert_allclose(raw.utility(scores, 1), 0.7 * np.array([1, 0, 0.5, 0.25])
                               + 0.3 * scores["pe"])
    assert raw.rank(ids, scores, query_index=1, rng=np.random.default_rng()) == ["d", "b", "c", "a"]


def test_minmax_constant_column() -> None:
    np.testing.assert_array_equal(minmax(np.array([2.0, 2.0])), [0.0, 0.0])


def test_unknown_strategy_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown strategy 'entropy'"):
        make_strategy("entropy")
    with pytest.raises(ConfigError, match="unknown strategy"):
        make_strategy("pe-dynamicc")
