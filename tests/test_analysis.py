"""fastshift.analysis against scipy.stats and hand-made cases."""

import math

import numpy as np
import pytest
import scipy.stats

from fastshift import analysis


def _cases():
    rng = np.random.default_rng(0)
    for n in (2, 3, 7, 50, 257):
        x = rng.normal(size=n)
        yield x, x + rng.normal(scale=0.7, size=n)  # correlated, no ties
        yield rng.integers(0, 4, n).astype(float), rng.integers(0, 3, n).astype(float)  # ties
        yield x, -x + 0.1 * rng.normal(size=n)


@pytest.mark.parametrize("case", list(_cases()))
def test_tau_and_rho_match_scipy(case):
    p, t = case
    want_tau = scipy.stats.kendalltau(p, t).statistic  # tau-b
    want_rho = scipy.stats.spearmanr(p, t).statistic
    got_tau, got_rho = analysis.kendall_tau(p, t), analysis.spearman_rho(p, t)
    if math.isnan(want_tau):
        assert math.isnan(got_tau)
    else:
        assert got_tau == pytest.approx(want_tau, abs=1e-12)
    if math.isnan(want_rho):
        assert math.isnan(got_rho)
    else:
        assert got_rho == pytest.approx(want_rho, abs=1e-12)


def test_hand_made_rankings():
    t = [0.9, 0.8, 0.7, 0.6, 0.5]
    assert analysis.kendall_tau(t, t) == 1.0
    assert analysis.kendall_tau(t[::-1], t) == -1.0
    # one swapped adjacent pair out of 10 pairs: (9 - 1) / 10
    assert analysis.kendall_tau([0.9, 0.7, 0.8, 0.6, 0.5], t) == pytest.approx(0.8)
    assert math.isnan(analysis.kendall_tau([1, 1, 1], [1, 2, 3]))


def test_order_preserving_global_and_local():
    truth = np.arange(10, dtype=float)          # architecture 9 is the best
    pred = truth.copy()
    pred[[9, 8]] = pred[[8, 9]]                 # the two best swapped: globally almost perfect
    r = analysis.order_preserving(pred, truth, top=0.2)
    assert r.n == 10 and r.n_local == 2 and r.k == 2
    assert r.global_tau == pytest.approx(1 - 2 * 1 / 45)
    assert r.local_tau == -1.0 and r.local_rho == -1.0
    assert r.topk_precision == 1.0              # both best two are still in the predicted top 2
    r3 = analysis.order_preserving(pred, truth, top=0.5, k=1)
    assert r3.n_local == 5 and r3.topk_precision == 0.0
    assert set(r3.to_dict()) >= {"global_tau", "local_tau", "topk_precision", "n"}


def test_topk_precision_counts_overlap():
    truth = [5, 4, 3, 2, 1]
    assert analysis.topk_precision([1, 2, 3, 4, 5], truth, 2) == 0.0
    assert analysis.topk_precision([5, 1, 4, 2, 3], truth, 3) == pytest.approx(2 / 3)


@pytest.mark.parametrize("args,match", [
    (([1, 2, 3], [1, 2]), "predicted has 3 scores but truth has 2"),
    (([1], [1]), "at least 2 architectures"),
    (([1, float("nan")], [1, 2]), "entry 1 is not"),
])
def test_bad_input_is_named(args, match):
    with pytest.raises(ValueError, match=match):
        analysis.order_preserving(*args)
    with pytest.raises(ValueError, match="top must be in"):
        analysis.order_preserving([1, 2], [1, 2], top=0)
