"""KID for the search: the same estimate as `models.metrics.kid.kid_from_features` (same random
subsets, same cubic kernel, unbiased MMD²), plus the standard deviation over its subsets, and fast
for the search's many calls against one set of originals.

The three kernel matrices (fake-fake, real-real, fake-real) are computed once over ALL features,
and the 100 subsets' kernel sums come from three products with their 0/1 row indicators; above
FULL_KERNEL_MAX rows a side (whose matrices would not fit comfortably) each subset is computed
directly with `mmd2_unbiased`. The subset spread is 0 when both sides have at most `subset_size`
images (every subset is then the whole set): the search reports KID's spread over repeats or seeds
beside it for that reason.
"""
from __future__ import annotations

import numpy as np
import torch

from models.metrics.kid import SEED, SUBSET_SIZE, SUBSETS, mmd2_unbiased

FULL_KERNEL_MAX = 4096


def _cubic_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (x·y / d + 1)³, KID's kernel (as models.metrics.kid defines it)."""
    return (a @ b.T / a.shape[1] + 1) ** 3


def kid_subset_values(real, fake, *, subsets: int = SUBSETS, subset_size: int = SUBSET_SIZE,
                      seed: int = SEED) -> np.ndarray:
    """The unbiased MMD² of each of `subsets` random subset pairs (size min(n_real, n_fake, subset_size));
    their mean is `kid_from_features(real, fake)` with the same arguments."""
    real = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    fake = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    m = min(real.shape[0], fake.shape[0], subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 images on each side, got {real.shape[0]} real and {fake.shape[0]} fake")
    g = torch.Generator().manual_seed(seed)   # drawn in kid_from_features' order: fake, then real
    draws = [(torch.randperm(fake.shape[0], generator=g)[:m], torch.randperm(real.shape[0], generator=g)[:m])
             for _ in range(subsets)]
    if max(real.shape[0], fake.shape[0]) > FULL_KERNEL_MAX:
        return np.array([float(mmd2_unbiased(fake[ix], real[iy])) for ix, iy in draws])
    # Every subset's kernel sums at once: with c_s the 0/1 indicator of subset s's rows (a subset
    # holds no row twice), the sum of K over the pairs of s is c_s' K c_s, its diagonal part
    # diag(K)' c_s. Three matrix products replace 3 x `subsets` gathers of m x m blocks.
    cx, cy = np.zeros((fake.shape[0], subsets)), np.zeros((real.shape[0], subsets))
    for s, (ix, iy) in enumerate(draws):
        cx[ix.numpy(), s], cy[iy.numpy(), s] = 1.0, 1.0
    kxx, kyy, kxy = (_cubic_kernel(p, q).numpy() for p, q in ((fake, fake), (real, real), (fake, real)))
    pairs_xx = (cx * (kxx @ cx)).sum(0) - np.diag(kxx) @ cx
    pairs_yy = (cy * (kyy @ cy)).sum(0) - np.diag(kyy) @ cy
    cross = (cx * (kxy @ cy)).sum(0)
    return (pairs_xx + pairs_yy) / (m * (m - 1)) - 2 * cross / (m * m)


def kid_with_std(real, fake, **kw) -> tuple[float, float]:
    """(KID, standard deviation over its subsets)."""
    v = kid_subset_values(real, fake, **kw)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0
