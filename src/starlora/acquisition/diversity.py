"""Typicality and diversity on prompt embeddings: `typiclust` and ``diversity: kmeans``.

Two selection rules that look at where prompts lie, not only at how uncertain the model is:

* `typiclust` (Hacohen, Dekel & Weinshall 2022, "Active Learning on a Budget: Opposite
  Strategies Suit High and Low Budgets", ICML; arXiv 2202.02794): at small budgets, label
  the most *typical* example of each region of the data that no label covers yet.
* `diverse_top` (a batch of uncertain *and* different examples): from the top m·B examples
  by a strategy's utility, one per k-means cluster. It is the pre-filter-then-cluster rule of
  Zhdanov 2019 ("Diverse mini-batch active learning", arXiv 1901.05954), with the highest
  utility member of a cluster chosen instead of the one nearest its centre, in the spirit of
  cluster-margin (Citovsky et al. 2021, "Batch Active Learning at Scale", NeurIPS), which
  also takes m·B uncertain candidates and spreads the batch over clusters.

Inputs are [N, d] float arrays of embeddings (`starlora.scoring.embeddings`: the frozen base
model's mean-pooled prompt states); distances are Euclidean. Clustering is scikit-learn's
k-means, seeded from the caller's generator, so a selection is a function of its inputs and
the query's random stream (`kmeans`). The pure functions on arrays (`kmeans`, `typicality`,
`typiclust`, `diverse_top`) come first, then the strategies built on them: `TypiClust`
(strategy ``typiclust``) and `Diverse` (``active_learning.diversity: kmeans``, wrapping any
other strategy). Both read the embedding columns of the score table
(`starlora.acquisition.base.ARRAY_COLUMNS`): ``embedding`` [N, d] and, for TypiClust,
``labelled_embedding`` [M, d].
"""

from __future__ import annotations

import warnings

import numpy as np

from starlora.acquisition.base import QueryStrategy, ScoreTable
from starlora.acquisition.registry import StrategyOptions, register_diversity, register_strategy
from starlora.errors import ConfigError

#: N·k up to which `kmeans` runs full Lloyd k-means; above it, mini-batch k-means (a pool of
#: 100,000 prompts into 500 clusters of SmolLM2's width takes seconds: docs/benchmarks.md)
FULL_KMEANS_LIMIT = 2_000_000
#: points per mini-batch of `MiniBatchKMeans`
MINI_BATCH = 4096
#: typicality looks at a seeded sample of at most this many members of a larger cluster
TYPICALITY_SAMPLE = 10_000


def kmeans(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """[N] int cluster index in [0, k) of each of `points` [N, d]: scikit-learn's `KMeans`
    (Lloyd iterations, the best of 3 k-means++ initialisations) when N·k <=
    `FULL_KMEANS_LIMIT`, else `MiniBatchKMeans` (one k-means++ initialisation, batches of
    `MINI_BATCH`); seeded with one draw from `rng`. With
    k >= N every point is its own cluster (no draw). Duplicate points may leave fewer than k
    clusters non-empty."""
    from sklearn.cluster import KMeans, MiniBatchKMeans
    from sklearn.exceptions import ConvergenceWarning

    n = len(points)
    if k <= 0:
        raise ValueError(f"kmeans: k must be positive, got {k}")
    if k >= n:
        return np.arange(n)
    seed = int(rng.integers(2**31 - 1))
    x = np.ascontiguousarray(points, dtype=np.float32)
    if n * k <= FULL_KMEANS_LIMIT:
        model = KMeans(n_clusters=k, random_state=seed, n_init=3)
    else:
        model = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=1,
                                batch_size=MINI_BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # duplicates: fewer clusters
        return model.fit_predict(x).astype(np.int64)


def typicality(points: np.ndarray, k_nn: int = 20) -> np.ndarray:
    """[n] float64: 1 / (mean Euclidean distance to the k nearest other points + 1e-5), with
    k = min(`k_nn`, n // 2) (Hacohen et al. 2022, eq. 2 and their code); all ones when k = 0
    (one point)."""
    from sklearn.neighbors import NearestNeighbors

    n = len(points)
    k = min(k_nn, n // 2)
    if k == 0:
        return np.ones(n)
    x = np.asarray(points, dtype=np.float64)
    dist, _ = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)
    return 1.0 / (dist[:, 1:].mean(axis=1) + 1e-5)  # column 0: the point itself (distance 0)


def typiclust(
    unlabelled: np.ndarray,
    labelled: np.ndarray,
    k: int,
    rng: np.random.Generator,
    *,
    k_nn: int = 20,
    min_cluster_size: int = 5,
    max_clusters: int = 500,
) -> tuple[np.ndarray, np.ndarray]:
    """TypiClust (TPC-RP) of Hacohen et al. 2022: the `k` unlabelled points to label next.

    `unlabelled` [N, d] and `labelled` [M, d] (M may be 0) embeddings. Returns (picked [k']
    indices into `unlabelled` in the order picked, k' = min(k, N); their typicality [k']).

    1. k-means (`kmeans`) of all N + M points into C = min(M + k, `max_clusters`, N + M)
       clusters (the paper: |labelled| + budget clusters; its code caps them at 500).
    2. Clusters with an unlabelled point are ordered by fewest labelled points, then largest
       size, then lowest index: first the largest clusters that no label covers.
    3. Round-robin over those with more than `min_cluster_size` points (the code's
       MIN_CLUSTER_SIZE = 5), in that order, each visit picking the cluster's most typical
       unlabelled point not picked yet: highest `typicality` among those points (k =
       min(`k_nn`, their number // 2); in a cluster of more than `TYPICALITY_SAMPLE`, among
       a seeded sample of that many), ties to the lowest index. A cluster whose points are
       all picked is skipped. When those clusters run out (the paper's code would stop),
       round-robin over the smaller ones the same way.
    """
    n, m = len(unlabelled), len(labelled)
    if n == 0 or k <= 0:
        return np.zeros(0, np.int64), np.zeros(0)
    if m and np.shape(labelled)[1] != np.shape(unlabelled)[1]:
        raise ValueError(f"typiclust: labelled width {np.shape(labelled)[1]} != "
                         f"unlabelled width {np.shape(unlabelled)[1]}")
    points = np.concatenate([labelled, unlabelled]) if m else np.asarray(unlabelled)
    labels = kmeans(points, min(m + k, max_clusters, n + m), rng)
    clusters = int(labels.max()) + 1
    size = np.bincount(labels, minlength=clusters)
    covered = np.bincount(labels[:m], minlength=clusters)
    free = [np.flatnonzero(labels[m:] == c) for c in range(clusters)]  # unlabelled members
    has_free = np.array([len(f) > 0 for f in free])
    big = has_free & (size > min_cluster_size)
    picked: list[int] = []
    values: list[float] = []
    taken = np.zeros(n, bool)
    want = min(k, n)
    for group in (np.flatnonzero(big), np.flatnonzero(has_free & ~big)):
        visit = group[np.lexsort((group, -size[group], covered[group]))]
        while len(picked) < want:  # round-robin over `visit` until its points run out
            before = len(picked)
            for c in visit:
                members = free[c][~taken[free[c]]]
                if len(members) == 0 or len(picked) == want:
                    continue
                if len(members) > TYPICALITY_SAMPLE:
                    members = np.sort(rng.choice(members, TYPICALITY_SAMPLE, replace=False))
                t = typicality(unlabelled[members], k_nn)
                best = int(np.argmax(t))  # the first of equal values: the lowest index
                picked.append(int(members[best]))
                values.append(float(t[best]))
                taken[members[best]] = True
            if len(picked) == before:
                break
    return np.array(picked, np.int64), np.array(values)


def diverse_top(
    order: np.ndarray,
    embeddings: np.ndarray,
    k: int,
    m: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """One point per k-means cluster among the best: the `k` indices to label, best first.

    `order` [N]: indices of the pool from the highest utility down (a strategy's ranking,
    ties already broken); `embeddings` [N, d]; `m` the size of the pre-filter in batches.

    1. Take the top T = min(⌈m·k⌉, N) of `order`. If T <= k, they are the batch.
    2. k-means (`kmeans`) their embeddings into k clusters.
    3. From each non-empty cluster take its member ranked highest in `order`.
    4. If duplicates left fewer than k clusters, fill up with the highest ranked of the top
       T not taken. The batch is returned in the order of `order` (highest utility first).
    """
    n = len(order)
    top = np.asarray(order[: min(int(np.ceil(m * k)), n)], np.int64)
    if len(top) <= k:
        return top
    labels = kmeans(embeddings[top], k, rng)
    first = np.full(k, -1, np.int64)  # per cluster, the position in `top` of its best member
    for pos in range(len(top) - 1, -1, -1):  # backwards: the best one is written last
        first[labels[pos]] = pos
    chosen = np.zeros(len(top), bool)
    chosen[first[first >= 0]] = True
    short = k - int(chosen.sum())
    if short:
        chosen[np.flatnonzero(~chosen)[:short]] = True
    return top[chosen]


class TypiClust(QueryStrategy):
    """`typiclust` as a strategy: reads ``embedding`` [N, d] and ``labelled_embedding``
    [M, d]; chooses its batch by `typiclust` (k = the query size), each with its typicality
    as its utility. Ranked without a batch size (`rank` with no k) every utility is 0 and
    the order is the query stream's random tie-break."""

    name = "typiclust"
    needs = ("embedding", "labelled_embedding")

    def utility(
        self, scores: ScoreTable, *, n: int, query_index: int, rng: np.random.Generator
    ) -> np.ndarray:
        return np.zeros(n)

    def batch(
        self, scores: ScoreTable, order: np.ndarray, utility: np.ndarray, k: int,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, np.ndarray]:
        labelled = np.asarray(scores["labelled_embedding"])
        unlabelled = np.asarray(scores["embedding"])
        if labelled.size == 0:
            labelled = np.zeros((0, unlabelled.shape[1]), unlabelled.dtype)
        return typiclust(unlabelled, labelled, k, rng)


class Diverse(QueryStrategy):
    """``active_learning.diversity: kmeans``: `inner`'s utility, its batch chosen by
    `diverse_top` among its top ``m`` × k (k = the query size) on ``embedding`` [N, d].
    The record (``selected.jsonl``) holds `inner`'s utility and terms, λ included."""

    def __init__(self, inner: QueryStrategy, m: float = 10):
        if isinstance(inner, (Diverse, TypiClust)):
            raise ConfigError(f"active_learning.diversity: {inner.name} chooses by clusters "
                              "already; use diversity: none")
        if m < 1:
            raise ConfigError(f"active_learning.diversity_pool: must be >= 1, got {m}")
        self.inner, self.m = inner, m
        self.name = f"{inner.name}+kmeans"
        self.needs = (*inner.needs, "embedding")

    def utility(
        self, scores: ScoreTable, *, n: int, query_index: int, rng: np.random.Generator
    ) -> np.ndarray:
        return self.inner.utility(scores, n=n, query_index=query_index, rng=rng)

    def terms(self, scores: ScoreTable, query_index: int) -> dict[str, np.ndarray | float]:
        return self.inner.terms(scores, query_index)

    def mixing_weight(self, query_index: int) -> float | None:
        return self.inner.mixing_weight(query_index)

    def batch(
        self, scores: ScoreTable, order: np.ndarray, utility: np.ndarray, k: int,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, None]:
        return diverse_top(order, np.asarray(scores["embedding"]), k, self.m, rng), None

    def __str__(self) -> str:
        return f"{self.inner}, diversity=kmeans(m={self.m:g})"


@register_strategy("typiclust")
def _typiclust(name: str, options: StrategyOptions) -> QueryStrategy:
    return TypiClust()


@register_diversity("kmeans")
def _kmeans(strategy: QueryStrategy, options: StrategyOptions) -> QueryStrategy:
    return Diverse(strategy, options.diversity_pool)
