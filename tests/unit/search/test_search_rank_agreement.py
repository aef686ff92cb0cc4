"""Rank agreement per subset size: the empty set left out, values equal to scipy's."""
import numpy as np
import pytest
from scipy.stats import kendalltau, spearmanr

from search.rank_agreement import agreement_by_size


def test_per_size_tau_and_rho_match_scipy_without_the_empty_set():
    rng = np.random.default_rng(1)
    ones = [(1, float(x), float(x + rng.normal(0, 0.3))) for x in rng.normal(size=6)]
    twos = [(2, float(x), float(-x)) for x in rng.normal(size=5)]
    empty = [(0, 0.0, 50.0)]
    out = agreement_by_size(ones + twos + empty, resamples=300, seed=0)
    assert [a.size for a in out] == [1, 2]
    for a, pts in zip(out, (ones, twos)):
        x, y = [p[1] for p in pts], [p[2] for p in pts]
        assert a.subsets == len(pts)
        assert a.tau == pytest.approx(kendalltau(x, y).statistic)
        assert a.rho == pytest.approx(spearmanr(x, y).statistic)
        assert a.tau_low <= a.tau_high and a.rho_low <= a.rho_high
    assert out[1].tau == pytest.approx(-1.0) and "did not reliably predict" in out[1].warning


def test_bootstrap_interval_matches_a_loop_over_resamples():
    pts = [(1, float(i), float(i + (i % 3))) for i in range(8)]
    a = agreement_by_size(pts, resamples=200, seed=5)[0]
    x, y = np.array([p[1] for p in pts]), np.array([p[2] for p in pts])
    idx = np.random.default_rng(5).integers(0, 8, (200, 8))
    taus = np.array([kendalltau(x[i], y[i]).statistic for i in idx])
    taus = taus[np.isfinite(taus)]
    assert (a.tau_low, a.tau_high) == pytest.approx(tuple(np.quantile(taus, [0.025, 0.975])))


def test_too_few_subsets_warns_in_plain_words():
    a = agreement_by_size([(1, 1.0, 2.0), (1, 2.0, 3.0)])[0]
    assert a.tau is None and "only 2 subset(s)" in a.warning
