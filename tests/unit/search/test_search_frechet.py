"""Fréchet distances from cached statistics, against torchmetrics (models.metrics.fid) and scipy."""
import itertools

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from models.metrics.fid import FrechetDistance
from search.frechet import Gaussian, MixtureTable, Reference, fid_features


class _Width(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.num_features = d


def torchmetrics_fid(real, fake) -> float:
    m = FrechetDistance(_Width(real.shape[1]))
    m.update_features(torch.as_tensor(real, dtype=torch.float32), real=True)
    m.update_features(torch.as_tensor(fake, dtype=torch.float32), real=False)
    return m.compute()


def scipy_fid(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2)
    return float(((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * root.real))


def feats(rng, n, d, shift=0.0, scale=1.0):
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return (rng.normal(size=(n, d)) @ mix * scale + shift).astype(np.float32)


@pytest.mark.parametrize("n, d", [(200, 16), (40, 64)])   # full rank, and N < d (low-rank reference)
def test_single_set_fid_matches_scipy_and_torchmetrics(n, d):
    rng = np.random.default_rng(0)
    x, y = feats(rng, n, d), feats(rng, n + 7, d, shift=0.3, scale=1.2)
    ref = Reference(x)
    assert ref.rank == min(d, n - 1)
    ours = ref.fid(ref.stats(y))
    assert ours == pytest.approx(scipy_fid(x, y), rel=1e-6)
    assert ours == pytest.approx(torchmetrics_fid(x, y), rel=1e-6)
    assert fid_features(y, x) == pytest.approx(scipy_fid(x, y), rel=1e-6)


def test_mixture_fid_matches_torchmetrics_on_concatenated_features():
    rng = np.random.default_rng(1)
    n, d, reps = 120, 24, 2
    orig = feats(rng, n, d)
    cands = [[feats(rng, n, d, shift=0.1 * c, scale=1 + 0.05 * r) for r in range(reps)] for c in range(5)]
    ref = Reference(orig)
    table = MixtureTable(ref, [[ref.stats(f) for f in per] for per in cands])
    subsets = np.array(list(itertools.combinations(range(5), 3)))
    got = table.fids(subsets)
    for row, subset in zip(got, subsets):
        for r in range(reps):
            mix = np.concatenate([orig] + [cands[c][r] for c in subset])
            assert row[r] == pytest.approx(torchmetrics_fid(orig, mix), rel=1e-6)
            assert row[r] == pytest.approx(scipy_fid(orig, mix), rel=1e-6)
    # The same through the unbatched path, and the empty subset (originals alone) is 0.
    assert ref.fid([ref.own, *table_stats(ref, cands, subsets[0], 0)]) == pytest.approx(got[0, 0], rel=1e-9)
    assert table.fids(np.zeros((1, 0), dtype=np.int64))[0, 0] == pytest.approx(0.0, abs=1e-9)


def table_stats(ref, cands, subset, r):
    return [ref.stats(cands[c][r]) for c in subset]


def test_low_rank_reference_mixture():
    """N < d: the reference covariance has rank N-1 and the r x r route must stay exact."""
    rng = np.random.default_rng(2)
    orig = feats(rng, 30, 64)
    other = feats(rng, 30, 64, shift=0.2)
    ref = Reference(orig)
    assert ref.rank == 29
    table = MixtureTable(ref, [[ref.stats(other)]])
    mix = np.concatenate([orig, other])
    assert table.fids(np.array([[0]]))[0, 0] == pytest.approx(scipy_fid(orig, mix), rel=1e-6)


def test_gaussian_pairwise_is_symmetric_and_matches_scipy():
    rng = np.random.default_rng(3)
    a, b = feats(rng, 90, 10), feats(rng, 80, 10, shift=0.5)
    from search.frechet import fid_gaussians
    ga, gb = Gaussian(a), Gaussian(b)
    assert fid_gaussians(ga, gb) == pytest.approx(fid_gaussians(gb, ga), rel=1e-6)
    assert fid_gaussians(ga, gb) == pytest.approx(scipy_fid(a, b), rel=1e-6)
    assert fid_gaussians(ga, Gaussian(a)) == pytest.approx(0.0, abs=1e-9)


def test_all_triples_of_31_candidates_are_scored_in_one_batch_as_one_at_a_time():
    # Its speed is measured in benchmarks/mineaug_search.py, not asserted here.
    rng = np.random.default_rng(4)
    ref = Reference(feats(rng, 256, 64))
    stats = [[ref.stats(feats(rng, 256, 64, shift=0.01 * c)) for _ in range(3)] for c in range(31)]
    table = MixtureTable(ref, stats)
    combos = np.array(list(itertools.combinations(range(31), 3)))
    out = table.fids(combos)
    assert out.shape == (4495, 3) and np.isfinite(out).all()
    for row in rng.choice(len(combos), 5, replace=False):
        assert table.fids(combos[row:row + 1])[0] == pytest.approx(out[row], rel=1e-9)


def test_screening_bounds_hold_and_the_screened_top_is_the_exact_top():
    from search.select import rank_subsets

    rng = np.random.default_rng(5)
    d = 32
    orig = feats(rng, 150, d)
    ref = Reference(orig)
    cands = [[feats(rng, 150, d, shift=0.02 * c, scale=1 + 0.03 * ((c * 7) % 5)) for _ in range(2)] for c in range(9)]
    table = MixtureTable(ref, [[ref.stats(f) for f in per] for per in cands])
    combos = np.array(list(itertools.combinations(range(9), 3)))
    exact = table.fids(combos)
    lower, upper = table.bounds(combos, rank=8)
    assert (lower <= exact + 1e-9).all() and (exact <= upper + 1e-9).all()
    names = [f"c{i}" for i in range(9)]
    screened = rank_subsets(table, names, 3, screen_rank=8, exact_top=5, max_exact=len(combos))
    full = rank_subsets(table, names, 3)
    assert [r.augmentations for r in screened[:5]] == [r.augmentations for r in full[:5]]
    assert all(r.exact for r in screened[:5])
    assert [r.fid for r in screened[:5]] == pytest.approx([r.fid for r in full[:5]], rel=1e-9)


def test_fewer_images_than_dimensions_uses_the_gram_matrix_and_agrees_with_the_covariance_route():
    """n <= d (Inception's 2048-d features of a small set): the reference is built from the n x n Gram
    matrix; its FIDs equal the d x d route's, computed here independently (eigh of S_ref, A S A)."""
    rng = np.random.default_rng(3)
    ref_f, other = rng.normal(size=(40, 120)), rng.normal(0.3, 1.2, size=(50, 120))
    ref = Reference(ref_f)
    assert ref.rank == 39
    s_ref, s = np.cov(ref_f, rowvar=False), np.cov(other, rowvar=False)
    lam, vec = np.linalg.eigh(s_ref)
    half = (vec * np.sqrt(np.clip(lam, 0, None))) @ vec.T
    root = np.sqrt(np.clip(np.linalg.eigvalsh(half @ s @ half), 0, None)).sum()
    expected = float(((ref_f.mean(0) - other.mean(0)) ** 2).sum() + np.trace(s_ref) + np.trace(s) - 2 * root)
    # rel 1e-6: the independent route takes square roots of S_ref's numerically-zero eigenvalues (~1e-8 noise).
    assert ref.fid(ref.stats(other)) == pytest.approx(expected, rel=1e-6)
