from __future__ import annotations

import numpy as np
import pytest

from starlora.acquisition import STRATEGIES, Dynamic, LambdaSchedule, make_strategy, minmax
from starlora.errors import ConfigError, EmptyPoolError, PoolExhaustedError, QuerySizeError


def table(n: int, seed: int = 0) -> tuple[list[str], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    ids = [f"x{i}" for i in range(n)]
    cols = {k: rng.gamma(2.0, 3.0, n) for k in ("pe", "me", "pe_base", "me_base")}
    cols["answer_tokens"] = rng.integers(1, 6, n).astype(float)  # few values: many ties
    for m in ("answer_entropy", "disagreement"):  # on 5 samples: few values, many ties
        cols |= {m: rng.integers(0, 5, n) / 4, f"{m}_base": rng.integers(0, 5, n) / 4}
    cols |= {"embedding": rng.standard_normal((n, 4)),
             "labelled_embedding": rng.standard_normal((3, 4))}
    return ids, cols


@pytest.mark.parametrize("name", STRATEGIES)
def test_contract(name: str) -> None:
    """Every strategy: a permutation of the pool, reproducible, typed errors, readable str()."""
    strategy = make_strategy(name, n_queries=4)
    ids, scores = table(50)
    ranked = strategy.rank(ids, scores, query_index=1, rng=np.random.default_rng(3))
    assert sorted(ranked) == sorted(ids)
    assert ranked == strategy.rank(ids, scores, query_index=1, rng=np.random.default_rng(3))
    # a strategy that chooses its batch as a set (typiclust) ranks it first when told its size
    first = strategy.rank(ids, scores, query_index=1, rng=np.random.default_rng(3), k=7)
    assert sorted(first) == sorted(ids) and (first == ranked or strategy.name == "typiclust")
    assert strategy.select(ids, scores, 7, query_index=1, rng=np.random.default_rng(3)) == first[:7]
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
        column = strategy.needs[0]
        bad = dict(scores, **{column: np.full_like(scores[column], np.nan)})
        with pytest.raises(ValueError, match="NaN"):
            strategy.rank(ids, bad, query_index=0, rng=np.random.default_rng())


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("k", [0, -1, -45])
def test_every_strategy_refuses_a_query_of_k_at_most_zero(name: str, k: int) -> None:
    """Issue 36, bug 2: ``order[:k]`` with k < 0 took all but the last |k| rows; the contract
    refuses k <= 0 for every strategy, diversity mode included, with take_rest too."""
    ids, scores = table(50)
    modes = ("none",) if name == "typiclust" else ("none", "kmeans")  # it clusters already
    for strategy in (make_strategy(name, n_queries=4, diversity=mode) for mode in modes):
        for take_rest in (False, True):
            with pytest.raises(QuerySizeError, match=f"k = {k}"):
                strategy.select_rows(ids, scores, k, query_index=0, rng=np.random.default_rng(),
                                     take_rest=take_rest)
        with pytest.raises(QuerySizeError):
            strategy.rank(ids, scores, query_index=0, rng=np.random.default_rng(), k=k)


def test_uncertainty_and_subtract_order() -> None:
    ids = ["a", "b", "c"]
    scores = {"pe": np.array([1.0, 3.0, 2.0]), "pe_base": np.array([0.0, 2.9, 0.0])}
    rng = np.random.default_rng(0)
    assert make_strategy("pe").rank(ids, scores, query_index=0, rng=rng) == ["b", "c", "a"]
    # subtract: 1.0, 0.1, 2.0
    assert make_strategy("pe-subtract").rank(ids, scores, query_index=0, rng=rng) == ["c", "a", "b"]


def test_ties_are_broken_by_the_seeded_rng() -> None:
    """All-tied scores: the order is the seeded generator's, the same for the same seed (a
    rerun, a resumed run) and different for another seed; ties never reorder real scores."""
    ids = [str(i) for i in range(20)]
    scores = {"me": np.ones(20)}

    def order(seed: int, table: dict = scores) -> list[str]:
        return make_strategy("me").rank(ids, table, query_index=0,
                                        rng=np.random.default_rng(seed))

    assert all(order(s) == order(s) for s in range(5))  # same seed, same order
    assert len({tuple(order(s)) for s in range(5)}) == 5  # other seeds, other orders
    assert order(0) != ids  # the order is drawn, not the input's
    partly = {"me": np.r_[np.ones(10), np.full(10, 2.0)]}  # ids 10-19 score higher
    for s in range(5):
        ranked = order(s, partly)
        assert sorted(ranked[:10], key=int) == ids[10:] and ranked == order(s, partly)


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
    rng = np.random.default_rng()
    u = strategy.utility(scores, n=4, query_index=1, rng=rng)
    expected = 0.7 * np.array([1, 0, 0.5, 0.25]) + 0.3 * np.array([0, 2 / 3, 1 / 3, 1])
    np.testing.assert_allclose(u, expected)  # 0.7, 0.2, 0.45, 0.475
    assert strategy.rank(ids, scores, query_index=1, rng=np.random.default_rng()) == ["a", "d", "c", "b"]
    # the authors' code leaves u_full raw: the raw term (tens of nats) drowns the base term
    raw = Dynamic("pe", LambdaSchedule("linear", 0.9, 0.1, 5), normalize="raw_full")
    np.testing.assert_allclose(raw.utility(scores, n=4, query_index=1, rng=rng),
                               0.7 * np.array([1, 0, 0.5, 0.25])
                               + 0.3 * scores["pe"])
    assert raw.rank(ids, scores, query_index=1, rng=np.random.default_rng()) == ["d", "b", "c", "a"]


def test_minmax_constant_column() -> None:
    np.testing.assert_array_equal(minmax(np.array([2.0, 2.0])), [0.0, 0.0])


def test_unknown_strategy_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown strategy 'entropy'"):
        make_strategy("entropy")
    with pytest.raises(ConfigError, match="unknown strategy"):
        make_strategy("pe-dynamicc")


def test_subtract_with_the_authors_normalisation() -> None:
    """Ours subtracts raw from raw; the authors' code subtracts min-max(u_base) from raw
    u_full, a [0, 1] term that cannot reorder items whose u_full differ by more than 1."""
    ids = ["a", "b", "c"]
    scores = {"pe": np.array([10.0, 12.0, 30.0]), "pe_base": np.array([1.0, 9.0, 28.0])}
    rng = np.random.default_rng(0)
    ours = make_strategy("pe-subtract")
    assert ours.rank(ids, scores, query_index=0, rng=rng) == ["a", "b", "c"]  # 9, 3, 2
    theirs = make_strategy("pe-subtract", normalize="raw_full")
    u = theirs.utility(scores, n=3, query_index=0, rng=rng)
    np.testing.assert_allclose(u, scores["pe"] - (scores["pe_base"] - 1) / 27)
    assert theirs.rank(ids, scores, query_index=0, rng=rng) == make_strategy("pe").rank(
        ids, scores, query_index=0, rng=rng)


def test_random_is_an_ordinary_strategy_and_nothing_else_is_silently_random() -> None:
    """`random` ranks by its own utility (uniform draws of the query's stream); a strategy
    that declares no score column still has its utility used, not a random order."""
    from starlora.acquisition import QueryStrategy

    ids = [f"x{i}" for i in range(30)]
    rows = make_strategy("random").select_rows(ids, {}, 5, query_index=0,
                                               rng=np.random.default_rng(7))
    draws = np.random.default_rng(7).random(30)
    assert [r["id"] for r in rows] == [ids[i] for i in np.argsort(-draws)[:5]]
    assert [r["utility"] for r in rows] == sorted(draws, reverse=True)[:5]

    class ByLength(QueryStrategy):  # needs no score column
        name = "by-length"

        def utility(self, scores, *, n, query_index, rng):
            return np.arange(n, dtype=float)

    for seed in range(3):
        assert ByLength().rank(ids, {}, query_index=0, rng=np.random.default_rng(seed)) == ids[::-1]


def test_selected_rows_carry_utility_and_terms() -> None:
    ids = ["a", "b", "c", "d"]
    scores = {"pe": np.array([10.0, 30.0, 20.0, 40.0]), "pe_base": np.array([4.0, 0.0, 2.0, 1.0])}
    strategy = make_strategy("pe-dynamic", n_queries=5)
    rows = strategy.select_rows(ids, scores, 2, query_index=1, rng=np.random.default_rng())
    assert [r["id"] for r in rows] == ["a", "d"] and [r["rank"] for r in rows] == [0, 1]
    assert rows[0] == pytest.approx({"id": "a", "rank": 0, "utility": 0.7, "pe": 10.0,
                                     "pe_base": 4.0, "u_base": 1.0, "u_full": 0.0,
                                     "lambda": 0.7})
    assert strategy.mixing_weight(1) == pytest.approx(0.7)
    assert make_strategy("pe").mixing_weight(1) is None


def test_a_registered_strategy_is_known_to_make_strategy_and_to_configs() -> None:
    """One registry: a factory registered under a name builds that strategy, configs accept
    the name at once, and a name cannot be taken twice."""
    from starlora.acquisition import QueryStrategy, StrategyOptions, register_strategy
    from starlora.acquisition.registry import _FACTORIES
    from starlora.config import load_config

    class Shortest(QueryStrategy):
        needs = ("pe",)

        def __init__(self, n_queries: int):
            self.name, self.n_queries = "test-shortest", n_queries

        def utility(self, scores, *, n, query_index, rng):
            return -np.asarray(scores["pe"], float)

    @register_strategy("test-shortest")
    def _make(name: str, options: StrategyOptions) -> QueryStrategy:
        return Shortest(options.n_queries)

    try:
        assert "test-shortest" in STRATEGIES
        strategy = make_strategy("test-shortest", n_queries=4)
        assert isinstance(strategy, Shortest) and strategy.n_queries == 4
        assert load_config(None, ["active_learning.strategy=test-shortest"])
        with pytest.raises(ValueError, match="registered twice"):
            register_strategy("test-shortest")(lambda name, options: Shortest(1))
        with pytest.raises(ValueError, match="registered twice"):
            register_strategy("pe")(_make)

        def _make(name: str, options: StrategyOptions) -> QueryStrategy:  # a cell run again
            return Shortest(options.n_queries + 1)

        register_strategy("test-shortest")(_make)
        assert make_strategy("test-shortest", n_queries=4).n_queries == 5
        with pytest.raises(TypeError, match="decorates a factory, not the class Shortest"):
            register_strategy("test-class")(Shortest)
        # a column no phase computes is refused before any work (it was a KeyError after
        # the first round's training)
        from starlora.run.pool_scores import check_scoring

        Shortest.needs = ("pe_variance",)
        with pytest.raises(ConfigError, match=r"needs pe_variance, which no phase computes; "
                                              r"known columns: pe, me, answer_entropy"):
            check_scoring(load_config(None), make_strategy("test-shortest"))
    finally:
        del _FACTORIES["test-shortest"]
    with pytest.raises(ConfigError, match="unknown strategy 'test-shortest'"):
        make_strategy("test-shortest")


def test_every_family_module_registers_its_strategies_on_import() -> None:
    """The package imports each of its modules, so a strategy's own module is the one file
    a new strategy touches."""
    import importlib
    import pkgutil

    import starlora.acquisition as acquisition

    modules = {m.name for m in pkgutil.iter_modules(acquisition.__path__)}
    assert {"base", "registry", "controls", "uncertainty", "dynamic"} <= modules
    from starlora.acquisition.registry import _FACTORIES

    owners = {importlib.import_module(f.__module__).__name__ for f in _FACTORIES.values()}
    assert owners <= {f"starlora.acquisition.{m}" for m in modules}
    assert {"random", "pe", "me", "pe-subtract", "me-subtract", "pe-dynamic",
            "me-dynamic"} <= set(STRATEGIES)


def test_length_ranks_the_longest_own_answer_first_and_breaks_ties_by_the_stream() -> None:
    ids = ["a", "b", "c", "d"]
    scores = {"answer_tokens": np.array([3.0, 48.0, 7.5, 48.0])}
    length = make_strategy("length")
    orders = {tuple(length.rank(ids, scores, query_index=0, rng=np.random.default_rng(s)))
              for s in range(20)}
    assert orders == {("b", "d", "c", "a"), ("d", "b", "c", "a")}  # the tie at 48, either way
    assert length.rank(ids, scores, query_index=0, rng=np.random.default_rng(1)) == \
        length.rank(ids, scores, query_index=0, rng=np.random.default_rng(1))
    rows = length.select_rows(ids, scores, 2, query_index=0, rng=np.random.default_rng(0))
    assert [r["utility"] for r in rows] == [48.0, 48.0] and rows[0]["answer_tokens"] == 48.0
