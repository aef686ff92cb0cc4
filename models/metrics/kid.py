"""Kernel distance between two image sets in the feature space of a chosen extractor (KID).

The unbiased estimate of the squared maximum mean discrepancy with the cubic polynomial kernel
k(x, y) = (x·y / d + 1)³, averaged over random subsets as StyleGAN2-ADA's kid50k_full does. Unlike
FID it has no bias towards larger samples, so values from small and large sets compare. Same
extractor caveat as FID: the number is on the scale of the feature space it was computed in.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from models.metrics.extractors import FeatureStore

SUBSETS = 100
SUBSET_SIZE = 1000
SEED = 0


def _cubic_kernel(a: Tensor, b: Tensor) -> Tensor:
    return (a @ b.T / a.shape[1] + 1) ** 3


def mmd2_unbiased(x: Tensor, y: Tensor) -> Tensor:
    """Unbiased MMD² of two equal-size samples (m, d) with the cubic polynomial kernel: the
    within-set means leave out the diagonal (each point with itself), the cross mean keeps all."""
    m = x.shape[0]
    kxx, kyy = _cubic_kernel(x, x), _cubic_kernel(y, y)
    within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return within - 2 * _cubic_kernel(x, y).mean()


def kid_from_features(real: Tensor, fake: Tensor, *, subsets: int = SUBSETS, subset_size: int = SUBSET_SIZE,
                      seed: int = SEED, device: str | torch.device = "cpu") -> float:
    """Mean unbiased MMD² over `subsets` pairs of random subsets (without replacement) of size
    min(n_real, n_fake, subset_size); the subsets come from `seed`, so the value is reproducible."""
    m = min(real.shape[0], fake.shape[0], subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 images on each side, got {real.shape[0]} real and {fake.shape[0]} fake")
    g = torch.Generator().manual_seed(seed)
    # float64: the kernel values are ~1-1000 and their differences, the KID, are far smaller.
    real, fake = real.to(device, torch.float64), fake.to(device, torch.float64)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for _ in range(subsets):
        x = fake[torch.randperm(fake.shape[0], generator=g)[:m].to(device)]
        y = real[torch.randperm(real.shape[0], generator=g)[:m].to(device)]
        total += mmd2_unbiased(x, y)
    return float(total / subsets)


class KernelDistance(FeatureStore):
    """Streaming KID: add uint8 NCHW batches of either side in any order, then `compute()`.

    Keeps every feature (N x num_features floats on the CPU). Needs at least two images on each
    side. Like `FrechetDistance`, it does not synchronise across processes.
    """

    def __init__(self, extractor: nn.Module, device: str | torch.device = "cpu", *, subsets: int = SUBSETS,
                 subset_size: int = SUBSET_SIZE, seed: int = SEED):
        super().__init__(extractor, device)
        self.subsets, self.subset_size, self.seed = subsets, subset_size, seed

    def compute(self) -> float:
        if self.counts["real"] < 2 or self.counts["fake"] < 2:
            raise ValueError(f"KID needs at least 2 images on each side, got {self.counts['real']} real "
                             f"and {self.counts['fake']} fake")
        return kid_from_features(self.side("real"), self.side("fake"), subsets=self.subsets,
                                 subset_size=self.subset_size, seed=self.seed, device=self.device)

