"""Ranking quality of a supernet against ground truth: Kendall tau-b, Spearman rho, and the
global / local order preservation of Supernet Shifting (local = the best architectures by
ground truth), plus top-k precision.

Scores are "higher is better" on both sides (pass accuracies, or negated errors). Inputs are
1-D sequences of equal length with at least two finite entries; ties are handled (tau-b,
average ranks).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["kendall_tau", "spearman_rho", "order_preserving", "OrderPreserving",
           "topk_precision"]


def _pair(predicted, truth, what: str) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(predicted, dtype=np.float64).reshape(-1)
    t = np.asarray(truth, dtype=np.float64).reshape(-1)
    if p.shape != t.shape:
        raise ValueError(f"{what}: predicted has {p.size} scores but truth has {t.size}")
    if p.size < 2:
        raise ValueError(f"{what}: needs at least 2 architectures, got {p.size}")
    bad = ~(np.isfinite(p) & np.isfinite(t))
    if bad.any():
        raise ValueError(f"{what}: scores must be finite; entry {int(np.flatnonzero(bad)[0])} "
                         "is not")
    return p, t


def kendall_tau(predicted, truth) -> float:
    """Kendall tau-b: ``sum_{i<j} s(p_i - p_j) s(t_i - t_j) / sqrt(P_p P_t)`` with P_x the
    number of pairs not tied in x (equals ``scipy.stats.kendalltau``). NaN when either side is
    constant. O(n^2) time in row blocks, O(n) memory per block."""
    p, t = _pair(predicted, truth, "kendall_tau")
    n = p.size
    concord = untied_p = untied_t = 0.0
    block = max(1, 4_000_000 // n)
    for start in range(0, n, block):
        sp = np.sign(p[start:start + block, None] - p[None, :])
        st = np.sign(t[start:start + block, None] - t[None, :])
        concord += float((sp * st).sum())
        untied_p += float(np.abs(sp).sum())
        untied_t += float(np.abs(st).sum())
    if untied_p == 0 or untied_t == 0:
        return math.nan
    return concord / math.sqrt(untied_p * untied_t)  # the ordered-pair double counts cancel


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(x.size, dtype=np.float64)
    sorted_x = x[order]
    start = 0
    for i in range(1, x.size + 1):
        if i == x.size or sorted_x[i] != sorted_x[start]:
            ranks[order[start:i]] = (start + i - 1) / 2.0 + 1.0
            start = i
    return ranks


def spearman_rho(predicted, truth) -> float:
    """Spearman rho: the Pearson correlation of average ranks (equals ``scipy.stats.spearmanr``).
    NaN when either side is constant."""
    p, t = _pair(predicted, truth, "spearman_rho")
    rp, rt = _average_ranks(p), _average_ranks(t)
    rp -= rp.mean()
    rt -= rt.mean()
    denom = math.sqrt(float((rp * rp).sum()) * float((rt * rt).sum()))
    return math.nan if denom == 0 else float((rp * rt).sum()) / denom


def _top(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest entries (ties broken by index, stable)."""
    return np.argsort(-x, kind="mergesort")[:k]


def topk_precision(predicted, truth, k: int) -> float:
    """|top-k by predicted  intersect  top-k by truth| / k."""
    p, t = _pair(predicted, truth, "topk_precision")
    if not 1 <= k <= p.size:
        raise ValueError(f"topk_precision: k must be in [1, {p.size}], got {k}")
    return len(set(_top(p, k).tolist()) & set(_top(t, k).tolist())) / k


@dataclass(frozen=True)
class OrderPreserving:
    """Result of :func:`order_preserving`. ``local_*`` are over the ``n_local`` best
    architectures by ground truth (the ``top`` fraction); ``topk_precision`` uses ``k``."""

    n: int
    top: float
    n_local: int
    global_tau: float
    global_rho: float
    local_tau: float
    local_rho: float
    k: int
    topk_precision: float

    def to_dict(self) -> dict:
        return asdict(self)


def order_preserving(predicted, truth, top: float = 0.2, k: int | None = None
                     ) -> OrderPreserving:
    """Global and local ranking quality of ``predicted`` scores against ``truth``.

    ``top`` in (0, 1]: the local region is the ``max(2, ceil(top * n))`` best architectures by
    truth; ``k`` (default: the local region's size) is the top-k of the precision.
    """
    p, t = _pair(predicted, truth, "order_preserving")
    if not 0 < top <= 1:
        raise ValueError(f"order_preserving: top must be in (0, 1], got {top}")
    n = p.size
    n_local = min(n, max(2, math.ceil(top * n)))
    local = _top(t, n_local)
    k = n_local if k is None else int(k)
    return OrderPreserving(
        n=n, top=top, n_local=n_local,
        global_tau=kendall_tau(p, t), global_rho=spearman_rho(p, t),
        local_tau=kendall_tau(p[local], t[local]), local_rho=spearman_rho(p[local], t[local]),
        k=k, topk_precision=topk_precision(p, t, k),
    )
