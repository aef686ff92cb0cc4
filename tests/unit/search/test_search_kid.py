"""KID beside FID: the search's fast KID against models.metrics.kid and a plain NumPy computation,
per candidate (stage 1), per K-set mixture, and the leak check's margin."""
import numpy as np
import pytest
import torch

from models.metrics.kid import kid_from_features
from search import kid as search_kid
from search.kid import kid_subset_values, kid_with_std
from search.scoring import CandidateScore, with_kids
from search.select import mixture_kid
from search.validate import leak_check


def _numpy_kid_values(real, fake, subsets, size, seed):
    """Unbiased MMD², cubic kernel, written out with loops over nothing but NumPy."""
    g = torch.Generator().manual_seed(seed)
    m = min(len(real), len(fake), size)
    k = lambda a, b: (a @ b.T / a.shape[1] + 1) ** 3
    out = []
    for _ in range(subsets):
        x = fake[torch.randperm(len(fake), generator=g)[:m].numpy()]
        y = real[torch.randperm(len(real), generator=g)[:m].numpy()]
        kxx, kyy = k(x, x), k(y, y)
        off = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        out.append(off - 2 * k(x, y).mean())
    return np.array(out)


@pytest.mark.parametrize("full_max", [4096, 10])     # the kernel-matrix route and the per-subset one
def test_kid_matches_the_metric_and_numpy(monkeypatch, full_max):
    monkeypatch.setattr(search_kid, "FULL_KERNEL_MAX", full_max)
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(120, 16)), rng.normal(0.2, size=(90, 16))
    values = kid_subset_values(real, fake, subsets=20, subset_size=50, seed=3)
    assert values == pytest.approx(_numpy_kid_values(real, fake, 20, 50, 3), rel=1e-10, abs=1e-12)
    assert values.mean() == pytest.approx(kid_from_features(torch.tensor(real), torch.tensor(fake), subsets=20,
                                                            subset_size=50, seed=3), rel=1e-10)
    mean, std = kid_with_std(real, fake, subsets=20, subset_size=50, seed=3)
    assert (mean, std) == pytest.approx((values.mean(), values.std(ddof=1)))


def test_candidate_and_mixture_kids_are_those_of_the_features():
    rng = np.random.default_rng(1)
    orig = rng.normal(size=(60, 8)).astype(np.float32)
    copies = {n: [rng.normal(s, size=(60, 8)).astype(np.float32) for _ in range(2)] for n, s in (("A", 0.1), ("B", 0.5))}
    scores = {n: with_kids(CandidateScore(n, [0.0, 0.0], [0.1, 0.1], f), orig) for n, f in copies.items()}
    for n, f in copies.items():
        direct = [kid_from_features(torch.tensor(orig), torch.tensor(x)) for x in f]
        assert scores[n].kids == pytest.approx(direct, rel=1e-9)
        assert scores[n].kid_std == pytest.approx(np.std(direct, ddof=1))
    mix = [kid_from_features(torch.tensor(orig), torch.tensor(np.concatenate([orig, copies["A"][r], copies["B"][r]])))
           for r in range(2)]
    assert mixture_kid(orig, scores, ["A", "B"]) == pytest.approx((np.mean(mix), np.std(mix, ddof=1)), rel=1e-9)
    assert np.isnan(mixture_kid(orig, scores, ["A", "B"], max_rows=100)[0])   # not cheap: left out


def test_leak_check_needs_more_than_noise():
    for seed in range(3):
        rng = np.random.default_rng(seed)
        orig = rng.normal(size=(400, 8))
        samples = rng.normal(size=(400, 8))                # the generator learned the originals
        twin = rng.normal(size=(400, 8))                   # an "augmented copy" with the originals' distribution
        leaks, report = leak_check(samples, orig, {"Twin": [twin]})
        # By chance the twin is closer (a rule without a margin flags it); within the noise margin: no leak.
        assert report["kid_samples_Twin"] < report["kid_samples_originals"]
        assert leaks == [] and report["margin"] > 0
    far = orig + 2.0
    leaks, report = leak_check(far[:300] + rng.normal(0, 0.1, size=(300, 8)), orig, {"Shift": [far]})
    assert leaks == ["Shift"]
    assert report["kid_samples_originals"] - report["kid_samples_Shift"] > report["margin"]
