"""Typicality and diversity on embeddings: TypiClust and k-means diversity on synthetic 2-D
pools whose clusters are known, and the embeddings they run on."""

from __future__ import annotations

import numpy as np
import pytest

from starlora.acquisition import make_strategy
from starlora.acquisition.diversity import diverse_top, kmeans, typicality, typiclust
from starlora.errors import ConfigError

CENTRES = np.array([[0.0, 0.0], [40.0, 0.0], [0.0, 40.0], [40.0, 40.0]])


def blobs(sizes: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(points [N, 2], blob [N]): Gaussian blobs (sd 1) around `CENTRES`, far apart, with a
    denser core: a quarter of each blob's points lie within 0.2 of its centre."""
    rng = np.random.default_rng(seed)
    points, blob = [], []
    for b, n in enumerate(sizes):
        core = n // 4
        spread = np.r_[np.full(core, 0.1), np.full(n - core, 1.5)]
        points.append(CENTRES[b] + rng.standard_normal((n, 2)) * spread[:, None])
        blob += [b] * n
    order = rng.permutation(sum(sizes))  # blobs interleaved in the pool
    return np.concatenate(points)[order], np.array(blob)[order]


def near_centre(points: np.ndarray, blob: np.ndarray, i: int) -> bool:
    return bool(np.linalg.norm(points[i] - CENTRES[blob[i]]) < 0.5)


def test_kmeans_finds_the_blobs_and_is_deterministic_for_a_seed() -> None:
    points, blob = blobs([30, 30, 30, 30])
    labels = kmeans(points, 4, np.random.default_rng(1))
    # one cluster per blob: the labelling is the blobs' up to renaming
    assert len({(a, b) for a, b in zip(labels, blob)}) == 4
    np.testing.assert_array_equal(labels, kmeans(points, 4, np.random.default_rng(1)))
    np.testing.assert_array_equal(kmeans(points[:3], 5, np.random.default_rng(0)), [0, 1, 2])


def test_kmeans_in_mini_batches_on_a_larger_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    import starlora.acquisition.diversity as diversity

    points, blob = blobs([400, 300, 200, 100])
    monkeypatch.setattr(diversity, "FULL_KMEANS_LIMIT", 100)  # force MiniBatchKMeans
    labels = kmeans(points, 4, np.random.default_rng(2))
    assert len({(a, b) for a, b in zip(labels, blob)}) == 4
    np.testing.assert_array_equal(labels, kmeans(points, 4, np.random.default_rng(2)))


def test_typicality_is_highest_in_the_dense_core() -> None:
    points, blob = blobs([40])
    t = typicality(points)
    assert near_centre(points, blob, int(np.argmax(t)))
    assert typicality(points[:1]).tolist() == [1.0]
    # k = min(20, n // 2): with 4 points, the mean distance to the 2 nearest others
    square = np.array([[0.0, 0], [1, 0], [0, 1], [1, 1]])
    np.testing.assert_allclose(typicality(square), 1 / (1 + 1e-5))


def test_typiclust_takes_the_typical_point_of_each_blob_largest_first() -> None:
    points, blob = blobs([60, 40, 30, 20])
    picked, values = typiclust(points, np.zeros((0, 2)), 4, np.random.default_rng(0))
    assert blob[picked].tolist() == [0, 1, 2, 3]  # no labels: by cluster size
    assert all(near_centre(points, blob, i) for i in picked)
    assert values.shape == (4,) and np.all(values > 0)
    again, _ = typiclust(points, np.zeros((0, 2)), 4, np.random.default_rng(0))
    np.testing.assert_array_equal(picked, again)


def test_typiclust_goes_to_the_blobs_no_label_covers() -> None:
    points, blob = blobs([60, 40, 30, 20])
    labelled = CENTRES[:2] + 0.3  # one label in each of the two largest blobs
    picked, _ = typiclust(points, labelled, 2, np.random.default_rng(3))
    assert blob[picked].tolist() == [2, 3]
    # more queries than clusters (4, capped): round-robin, uncovered ones first, by size
    picked, _ = typiclust(points, labelled, 6, np.random.default_rng(3), max_clusters=4)
    assert blob[picked].tolist() == [2, 3, 0, 1, 2, 3] and len(set(picked.tolist())) == 6


def test_typiclust_on_a_tiny_pool_picks_every_point_once() -> None:
    points = np.array([[0.0, 0], [5, 5], [5, 5.1], [9, 0]])
    picked, _ = typiclust(points, np.zeros((0, 2)), 10, np.random.default_rng(0))
    assert sorted(picked.tolist()) == [0, 1, 2, 3]


def uncertain_blobs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(points, blob, utility): blobs 0-2 uncertain (0 most), blob 3 the least uncertain."""
    points, blob = blobs([50, 50, 50, 50], seed=4)
    rng = np.random.default_rng(5)
    base = np.array([0.9, 0.8, 0.7, 0.0])[blob]
    return points, blob, base + 0.1 * rng.random(len(blob))


def test_diverse_top_takes_the_most_uncertain_point_of_each_cluster_of_the_top() -> None:
    points, blob, u = uncertain_blobs()
    order = np.argsort(-u, kind="stable")
    plain = order[:3]
    assert blob[plain].tolist() == [0, 0, 0]  # plain top-3: all from the most uncertain blob
    picked = diverse_top(order, points, 3, m=50, rng=np.random.default_rng(0))
    # the top 150 are blobs 0-2; one per cluster, each its blob's most uncertain point
    best = [int(np.flatnonzero(blob == b)[np.argmax(u[blob == b])]) for b in (0, 1, 2)]
    assert picked.tolist() == best
    np.testing.assert_array_equal(picked,
                                  diverse_top(order, points, 3, 50, np.random.default_rng(0)))


def test_diverse_top_stays_within_the_pre_filter() -> None:
    points, blob, u = uncertain_blobs()
    order = np.argsort(-u, kind="stable")
    # m·k = 20 points, all in blob 0: whatever the clusters, the batch is from blob 0
    picked = diverse_top(order, points, 4, m=5, rng=np.random.default_rng(0))
    assert len(picked) == 4 and set(blob[picked]) == {0}
    assert picked[0] == order[0]  # the most uncertain point heads its cluster
    # m = 1: the pre-filter is the batch, plain top-k
    assert diverse_top(order, points, 4, 1, np.random.default_rng(0)).tolist() == \
        order[:4].tolist()


def test_diverse_top_fills_up_when_duplicates_leave_fewer_clusters() -> None:
    points = np.array([[0.0, 0]] * 6 + [[9.0, 9]] * 6)
    order = np.arange(12)
    picked = diverse_top(order, points, 3, 4, np.random.default_rng(0))
    assert picked.tolist() == [0, 1, 6]  # a point of each place, then the next best


# -- as strategies: numbers in, ranked ids out ---------------------------------------------
def table(points: np.ndarray, u: np.ndarray, labelled: np.ndarray | None = None) -> dict:
    return {"pe": u, "pe_base": u[::-1].copy(), "embedding": points,
            "labelled_embedding": np.zeros((0, 2)) if labelled is None else labelled}


def test_typiclust_strategy_selects_its_picks_with_their_typicality() -> None:
    points, blob = blobs([60, 40, 30, 20])
    ids = [f"x{i}" for i in range(len(points))]
    strategy = make_strategy("typiclust")
    scores = table(points, np.zeros(len(points)), CENTRES[:2] + 0.3)
    rows = strategy.select_rows(ids, scores, 2, query_index=0, rng=np.random.default_rng(7))
    rng = np.random.default_rng(7)
    rng.random(len(ids))  # the query stream's tie-break key comes first
    picked, values = typiclust(points, CENTRES[:2] + 0.3, 2, rng)
    assert [r["id"] for r in rows] == [ids[i] for i in picked]
    assert [r["utility"] for r in rows] == values.tolist()
    assert [blob[ids.index(r["id"])] for r in rows] == [2, 3]
    assert [r["rank"] for r in rows] == [0, 1] and set(rows[0]) == {"id", "rank", "utility"}
    assert all(r["utility"] > 1 for r in rows)  # typicality: 1 / mean distance, within 1.5 sd
    again = strategy.select_rows(ids, scores, 2, query_index=0, rng=np.random.default_rng(7))
    assert again == rows
    ranked = strategy.rank(ids, scores, query_index=0, rng=np.random.default_rng(7), k=2)
    assert ranked[:2] == [r["id"] for r in rows] and sorted(ranked) == sorted(ids)


def test_any_strategy_made_diverse_picks_one_per_cluster_of_its_top() -> None:
    points, blob, u = uncertain_blobs()
    ids = [f"x{i}" for i in range(len(points))]
    scores = table(points, u)
    rng = np.random.default_rng
    plain = make_strategy("pe").select(ids, scores, 3, query_index=0, rng=rng(1))
    assert [blob[ids.index(i)] for i in plain] == [0, 0, 0]
    diverse = make_strategy("pe", diversity="kmeans", diversity_pool=50)
    rows = diverse.select_rows(ids, scores, 3, query_index=0, rng=rng(1))
    assert [blob[ids.index(r["id"])] for r in rows] == [0, 1, 2]
    assert rows[0]["id"] == plain[0] and all(r["utility"] == r["pe"] for r in rows)
    assert diverse.needs == ("pe", "embedding") and str(diverse) == \
        "pe, diversity=kmeans(m=50)"
    assert diverse.select_rows(ids, scores, 3, query_index=0, rng=rng(1)) == rows
    # a dynamic strategy keeps its λ and terms in the record
    dynamic = make_strategy("pe-dynamic", n_queries=3, diversity="kmeans", diversity_pool=50)
    rows = dynamic.select_rows(ids, scores, 3, query_index=1, rng=rng(1))
    assert rows[0]["lambda"] == pytest.approx(0.5) and dynamic.mixing_weight(1) == 0.5
    assert {"u_base", "u_full", "pe", "pe_base"} <= set(rows[0])


def test_the_embedding_columns_are_checked() -> None:
    points, _, u = uncertain_blobs()
    ids = [f"x{i}" for i in range(len(points))]
    strategy = make_strategy("me", diversity="kmeans")
    with pytest.raises(KeyError, match="embedding"):
        strategy.select(ids, {"me": u}, 3, query_index=0, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="shape"):
        strategy.select(ids, {"me": u, "embedding": points[:-1]}, 3, query_index=0,
                        rng=np.random.default_rng(0))
    with pytest.raises(ConfigError, match="typiclust"):
        make_strategy("typiclust", diversity="kmeans")
    with pytest.raises(ConfigError, match="diversity"):
        make_strategy("pe", diversity="kcenter")
