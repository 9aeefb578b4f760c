"""Numbers of confidence signals: does a model's confidence tell right answers from wrong ones,
and does it mean what it says? Pure NumPy and scikit-learn: arrays in, numbers out.

A *signal* is one confidence per item (higher = more sure), `correct` one 0/1 per item.
Names follow LM-Polygraph (Fadeeva et al. 2023), so figures compare with that literature:

* ``roc-auc``: AUROC of the signal for a *correct* answer (`auroc`; scikit-learn's
  ``roc_auc_score``, ties counting 1/2). 0.5 = the signal cannot rank; NaN when every answer
  is right or every answer is wrong.
* ``rcc-auc``: AURC, the area under the risk-coverage curve (`aurc`): answer the most
  confident items first; at coverage i/N the selective risk is the error rate of the i most
  confident; AURC is the mean of that risk over i = 1..N (lower is better; a signal that
  cannot rank gets the error rate, a perfect one the least the accuracy allows).
* ``sel-acc@50``, ``sel-acc@80``: accuracy of the 50% / 80% most confident items
  (`selective_accuracy`; ceil(c * N) items).
* ``brier``: mean squared difference of confidence and correctness (scikit-learn's
  ``brier_score_loss``); needs confidences in [0, 1].
* ``ece``: equal-width ECE (`expected_calibration_error`, 15 bins by default), as before;
  ``ece-adaptive``: equal-mass bins (`adaptive_ece`), each bin holding N / n_bins items, so
  that a signal piled up near 1 is not judged by one crowded bin.

Ties in a signal (many answer-span probabilities are 0.99999...) are resolved by expectation:
the risk-coverage curve and selective accuracy average over every order of tied items, so a
constant signal gets exactly the error rate at every coverage, whatever the input order.

Also here: Cohen's `kappa` (agreement of two rounds' answers on a stop set) and
`fit_temperature` (one temperature minimising the NLL of gold tokens).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: the coverages of `selective_accuracy` reported per signal
COVERAGES = (0.5, 0.8)


def _arrays(confidence: Sequence[float], correct: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(confidence, dtype=np.float64).reshape(-1)
    y = np.asarray(correct, dtype=np.float64).reshape(-1)
    if c.shape != y.shape:
        raise ValueError(f"confidence {c.shape} and correct {y.shape} differ")
    if not np.isfinite(c).all():
        raise ValueError("confidence values must be finite")
    return c, y


def auroc(confidence: Sequence[float], correct: Sequence[float]) -> float:
    """AUROC of `confidence` [N] for ``correct`` [N] (0/1): the chance that a right answer is
    more confident than a wrong one, ties 1/2. NaN when one class is empty."""
    from sklearn.metrics import roc_auc_score

    c, y = _arrays(confidence, correct)
    if y.min(initial=1) == y.max(initial=0):
        return float("nan")
    return float(roc_auc_score(y > 0.5, c))


def expected_errors(confidence: Sequence[float], correct: Sequence[float]) -> np.ndarray:
    """[N]: the expected number of wrong answers among the i + 1 most confident items, ties in
    `confidence` averaged over their orders (within a tied group of size g with e errors, each
    item adds e / g)."""
    c, y = _arrays(confidence, correct)
    order = np.argsort(-c, kind="stable")
    cs, err = c[order], 1.0 - y[order]
    per_item = np.empty(len(c))
    start = 0
    for end in range(1, len(c) + 1):
        if end == len(c) or cs[end] != cs[start]:
            per_item[start:end] = err[start:end].mean()
            start = end
    return np.cumsum(per_item)


def risk_coverage(confidence: Sequence[float], correct: Sequence[float]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(coverage [N], selective risk [N]): coverage i / N and the (expected) error rate of the
    i most confident items, i = 1..N."""
    errors = expected_errors(confidence, correct)
    i = np.arange(1, len(errors) + 1)
    return i / len(errors), errors / i


def aurc(confidence: Sequence[float], correct: Sequence[float]) -> float:
    """Area under the risk-coverage curve (LM-Polygraph's ``rcc-auc``): the mean selective risk
    over coverages 1/N..N/N; NaN for no items."""
    if len(confidence) == 0:
        return float("nan")
    return float(risk_coverage(confidence, correct)[1].mean())


def selective_accuracy(confidence: Sequence[float], correct: Sequence[float],
                       coverage: float) -> float:
    """Accuracy of the ceil(`coverage` * N) most confident items (ties by expectation)."""
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    errors = expected_errors(confidence, correct)
    if not len(errors):
        return float("nan")
    k = max(1, math.ceil(coverage * len(errors) - 1e-9))
    return float(1.0 - errors[k - 1] / k)


def brier(confidence: Sequence[float], correct: Sequence[float]) -> float:
    """Brier score: mean of (confidence - correct)^2; confidences must be in [0, 1]."""
    from sklearn.metrics import brier_score_loss

    c, y = _arrays(confidence, correct)
    if not len(c):
        return float("nan")
    return float(brier_score_loss(y > 0.5, c))


def expected_calibration_error(
    confidence: Sequence[float], correct: Sequence[float], n_bins: int = 15
) -> tuple[float, list[dict]]:
    """ECE over `n_bins` equal-width bins of [0, 1]: ``sum_b |B_b| / N * |acc_b - conf_b|``.

    Bin b holds confidences in ``(b / n_bins, (b + 1) / n_bins]`` (a confidence of exactly 0
    goes to the first bin). Returns the ECE and, per bin, ``lower``, ``upper``, ``count``
    and the mean ``confidence`` and ``accuracy`` of its members (None when it is empty).
    """
    c, y = _arrays(confidence, correct)
    index = np.clip(np.ceil(c * n_bins).astype(int) - 1, 0, n_bins - 1)
    bins = []
    for b in range(n_bins):
        members = index == b
        count = int(members.sum())
        conf = float(c[members].mean()) if count else None
        acc = float(y[members].mean()) if count else None
        bins.append({"lower": b / n_bins, "upper": (b + 1) / n_bins, "count": count,
                     "confidence": conf, "accuracy": acc})
    return ece_from_bins(bins), bins


def adaptive_ece(
    confidence: Sequence[float], correct: Sequence[float], n_bins: int = 15
) -> tuple[float, list[dict]]:
    """ECE over equal-mass bins: the items sorted by confidence (stable) and cut into
    ``min(n_bins, N)`` consecutive groups whose sizes differ by at most one (larger groups
    first, as ``np.array_split``). Bins as `expected_calibration_error` gives them, ``lower``
    and ``upper`` the smallest and largest confidence in the bin."""
    c, y = _arrays(confidence, correct)
    if not len(c):
        return 0.0, []
    order = np.argsort(c, kind="stable")
    bins = []
    for members in np.array_split(order, min(n_bins, len(c))):
        bins.append({"lower": float(c[members].min()), "upper": float(c[members].max()),
                     "count": len(members), "confidence": float(c[members].mean()),
                     "accuracy": float(y[members].mean())})
    return ece_from_bins(bins), bins


def ece_from_bins(bins: list[dict]) -> float:
    """``sum_b count_b / N * |accuracy_b - confidence_b|`` over reliability bins (as
    `expected_calibration_error` returns them, or pooled over runs); 0 for no examples."""
    total = sum(b["count"] for b in bins)
    if not total:
        return 0.0
    return sum(b["count"] / total * abs(b["accuracy"] - b["confidence"])
               for b in bins if b["count"])


def signal_metrics(confidence: Sequence[float], correct: Sequence[float],
                   n_bins: int = 15) -> dict[str, float]:
    """Every number above for one signal, by its LM-Polygraph-style name: ``roc-auc``,
    ``rcc-auc``, ``sel-acc@50``, ``sel-acc@80``, ``brier``, ``ece``, ``ece-adaptive``."""
    out = {"roc-auc": auroc(confidence, correct), "rcc-auc": aurc(confidence, correct)}
    for cov in COVERAGES:
        out[f"sel-acc@{round(cov * 100)}"] = selective_accuracy(confidence, correct, cov)
    out["brier"] = brier(confidence, correct)
    out["ece"] = expected_calibration_error(confidence, correct, n_bins)[0]
    out["ece-adaptive"] = adaptive_ece(confidence, correct, n_bins)[0]
    return out


def kappa(a: Sequence[object], b: Sequence[object]) -> float:
    """Cohen's kappa of two labelings of the same items: ``(p_o - p_e) / (1 - p_e)``, p_o the
    share of items labelled alike, p_e the agreement expected from each labeling's label
    frequencies. When p_e = 1 (both give one same label to every item) kappa is 1. Labels are
    compared as strings (None is its own label)."""
    if len(a) != len(b):
        raise ValueError(f"kappa: {len(a)} and {len(b)} labels")
    if not len(a):
        return float("nan")
    x, y = [str(v) for v in a], [str(v) for v in b]
    p_o = float(np.mean([u == v for u, v in zip(x, y)]))
    labels = sorted(set(x) | set(y))
    fx = np.array([x.count(k) for k in labels]) / len(x)
    fy = np.array([y.count(k) for k in labels]) / len(y)
    p_e = float(fx @ fy)
    if p_e >= 1.0 - 1e-12:
        return 1.0 if p_o >= 1.0 - 1e-12 else 0.0
    return (p_o - p_e) / (1.0 - p_e)


def exact_match(a: Sequence[object], b: Sequence[object]) -> float:
    """Share of items whose two answers are equal (None equals None); NaN for no items."""
    if len(a) != len(b):
        raise ValueError(f"exact_match: {len(a)} and {len(b)} answers")
    return float(np.mean([u == v for u, v in zip(a, b)])) if len(a) else float("nan")


def gold_nll(logits: np.ndarray, targets: np.ndarray, temperature: float) -> float:
    """Mean NLL (nats per token) of `targets` [T] under ``softmax(logits / temperature)``,
    `logits` [T, V]."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    logz = np.log(np.exp(z).sum(axis=1))
    return float((logz - z[np.arange(len(z)), np.asarray(targets)]).mean())


def fit_temperature(logits: np.ndarray, targets: np.ndarray,
                    bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature T in `bounds` minimising `gold_nll` of `targets` [T] given `logits`
    [T, V]: golden-section search on log T (the NLL is convex in 1 / T, so unimodal in log T),
    to a relative precision of about 1e-6."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or len(logits) != len(targets) or not len(targets):
        raise ValueError(f"fit_temperature: logits {logits.shape}, {len(targets)} targets")

    def nll(t: float) -> float:
        return gold_nll(logits, targets, math.exp(t))

    ratio = (math.sqrt(5) - 1) / 2
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(a), nll(b)
    while hi - lo > 1e-6:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(b)
    return float(math.exp((lo + hi) / 2))


def temperature_grid(low: float = 0.05, high: float = 20.0, n: int = 121) -> np.ndarray:
    """`n` temperatures spaced evenly in log T over [low, high] (121: a step of about 5%)."""
    return np.exp(np.linspace(math.log(low), math.log(high), n))


def best_on_grid(temperatures: Sequence[float], nll: Sequence[float]) -> float:
    """The temperature minimising an NLL known on a log-spaced grid: the grid's best point,
    refined by the vertex of the parabola through it and its neighbours in log T (kept
    within them); an end point of the grid is returned as it is."""
    t = np.log(np.asarray(temperatures, dtype=np.float64))
    y = np.asarray(nll, dtype=np.float64)
    i = int(np.argmin(y))
    if i == 0 or i == len(y) - 1:
        return float(math.exp(t[i]))
    (x0, x1, x2), (y0, y1, y2) = t[i - 1 : i + 2], y[i - 1 : i + 2]
    denom = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denom
    b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / denom
    vertex = -b / (2 * a) if a > 0 else x1
    return float(math.exp(min(max(vertex, x0), x2)))
