"""Ranking quality of a supernet against ground truth: Kendall tau-b, Spearman rho, and the
global / local order preservation of Supernet Shifting (local = the best architectures by
ground truth), plus top-k precision.

Scores are "higher is better" on both sides (pass accuracies, or negated errors). Inputs are
1-D sequences of equal length with at least two finite entries; ties are handled (tau-b,
average ranks).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = ["kendall_tau", "spearman_rho", "order_preserving", "OrderPreserving",
           "topk_precision", "GroundTruth", "load_ground_truth", "BUILTIN_GROUND_TRUTH"]

_RESOURCES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "resources")

# Ground-truth tables shipped with the package (built by benchmarks/make_ground_truth.py): every
# architecture of ``fastshift.spaces.digits`` trained from scratch on ``fastshift.data.digits``.
BUILTIN_GROUND_TRUTH = {
    "digits": os.path.join(_RESOURCES, "digits_ground_truth.csv"),
    "digits5-9": os.path.join(_RESOURCES, "digits59_ground_truth.csv"),
}


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


@dataclass
class GroundTruth:
    """Architectures with their ground-truth accuracy (higher is better).

    ``archs``: tuples of choice indices; ``accuracy``: float64 ``[n]``; ``columns``: any further
    numeric columns of the file (e.g. ``accuracy_std``, ``flops``, ``params``), each ``[n]``;
    ``meta``: the protocol record next to a built-in table (its ``.json``), else empty.
    """

    archs: list
    accuracy: np.ndarray
    columns: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    source: str = ""

    def __len__(self) -> int:
        return len(self.archs)

    def index(self) -> dict:
        """``{arch: row}``."""
        return {a: i for i, a in enumerate(self.archs)}

    def rank(self, arch) -> int:
        """1-based rank of ``arch`` by ground-truth accuracy (1 = best; ties share the best
        rank)."""
        row = self.index().get(tuple(int(g) for g in arch))
        if row is None:
            raise KeyError(f"{tuple(arch)} is not in the ground truth {self.source}")
        return int((self.accuracy > self.accuracy[row]).sum()) + 1

    def lookup(self, archs) -> np.ndarray:
        """Ground-truth accuracies of ``archs`` (KeyError naming a missing one)."""
        idx = self.index()
        out = []
        for a in archs:
            key = tuple(int(g) for g in a)
            if key not in idx:
                raise KeyError(f"{key} is not in the ground truth {self.source}")
            out.append(self.accuracy[idx[key]])
        return np.asarray(out)


def _parse_arch(value, where: str) -> tuple:
    if isinstance(value, str):
        tokens = [t for t in re.split(r"[\s,;()\[\]-]+", value) if t]
        try:
            return tuple(int(t) for t in tokens)
        except ValueError:
            raise ValueError(f"{where}: arch must be ints like 0-1-2-3 or 0,1,2,3, got "
                             f"{value!r}") from None
    if isinstance(value, (list, tuple)) and all(isinstance(g, int) for g in value):
        return tuple(value)
    raise ValueError(f"{where}: arch must be a list of ints or a string like 0-1-2-3, got "
                     f"{value!r}")


def load_ground_truth(source, space=None) -> GroundTruth:
    """A ground-truth table: a built-in name (``digits``, ``digits5-9``, see
    ``BUILTIN_GROUND_TRUTH``), a CSV with columns ``arch`` and ``accuracy`` (arch written
    ``0-1-2-3``, ``0,1,2,3`` or ``(0, 1, 2, 3)``; other numeric columns are kept), or a JSON list
    of ``{"arch": [...], "accuracy": x, ...}``.

    ``space``: when given, every architecture is validated against it. Raises
    FileNotFoundError for a missing file and ValueError naming the row and field of a bad one
    (missing field, bad arch, non-finite accuracy, duplicate arch, fewer than 2 rows).
    """
    path = BUILTIN_GROUND_TRUTH.get(source, os.fspath(source))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ground-truth file not found: {path}" + (
            "" if source in BUILTIN_GROUND_TRUTH else
            f" (built-in tables: {sorted(BUILTIN_GROUND_TRUTH)})"))
    if path.endswith(".json"):
        with open(path) as f:
            rows = json.load(f)
        if not isinstance(rows, list):
            raise ValueError(f'{path}: expected a JSON list of {{"arch": ..., "accuracy": ...}}')
    else:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    archs, accs, extra = [], [], {}
    seen = {}
    for i, row in enumerate(rows):
        where = f"{path}: row {i}"
        if not isinstance(row, dict) or "arch" not in row or "accuracy" not in row:
            raise ValueError(f"{where} needs the fields 'arch' and 'accuracy'")
        arch = _parse_arch(row["arch"], where)
        if space is not None:
            try:
                arch = space.validate(arch)
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
        if arch in seen:
            raise ValueError(f"{where}: arch {arch} repeats row {seen[arch]}")
        seen[arch] = i
        try:
            acc = float(row["accuracy"])
        except (TypeError, ValueError):
            acc = math.nan
        if not math.isfinite(acc):
            raise ValueError(f"{where}: accuracy must be a finite number, got {row['accuracy']!r}")
        archs.append(arch)
        accs.append(acc)
        for key, value in row.items():
            if key in ("arch", "accuracy"):
                continue
            try:
                extra.setdefault(key, []).append(float(value))
            except (TypeError, ValueError):
                extra.setdefault(key, []).append(math.nan)
    if len(archs) < 2:
        raise ValueError(f"{path}: needs at least 2 architectures, got {len(archs)}")
    columns = {k: np.asarray(v) for k, v in extra.items()
               if len(v) == len(archs) and not np.isnan(v).all()}
    meta = {}
    meta_path = os.path.splitext(path)[0] + ".json"
    if not path.endswith(".json") and os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
    return GroundTruth(archs=archs, accuracy=np.asarray(accs, dtype=np.float64),
                       columns=columns, meta=meta, source=path)
