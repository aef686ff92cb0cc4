"""Fréchet distance between two image sets in the feature space of a chosen extractor (FID).

The statistics are torchmetrics' `FrechetInceptionDistance` with our own feature module, so no
weights are downloaded; which extractor was used must be logged next to the number, because
FIDs from different extractors are on different scales (see `models.metrics.extractors`).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from models.metrics.extractors import FeatureMetric


class _GivenFeatures(nn.Module):
    """torchmetrics' FID runs its feature module on what `update` gets: here, features already
    extracted, so one extractor pass per batch serves FID, KID and precision/recall alike."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


class FrechetDistance(FeatureMetric):
    """Streaming FID: add uint8 NCHW batches of either side in any order (or their features),
    then `compute()`. Only the running feature sums stay in memory. Needs at least two images on
    each side (a covariance of one sample is undefined). The extractor is moved to `device`.
    """

    def __init__(self, extractor: nn.Module, device: str | torch.device = "cpu"):
        if not hasattr(extractor, "num_features"):
            # Otherwise torchmetrics probes the module with a random 299x299 image to learn the width.
            raise TypeError("the extractor must have an int attribute `num_features`")
        super().__init__(extractor, device)
        self.metric = FrechetInceptionDistance(
            feature=_GivenFeatures(extractor.num_features),
            normalize=False,
            sync_on_compute=False,      # no collective calls: it may run on one rank of a process group
            dist_sync_on_step=False,
        ).to(device)
        # The dtype compute() returns in, which update() records; a suite that only merged other
        # suites' states (models.metrics.merge) never updated. Extractors give float32 features.
        self.metric.orig_dtype = torch.float32

    def _add(self, features: Tensor, real: bool) -> None:
        self.metric.update(features.to(self.device), real=real)

    def compute(self) -> float:
        if self.counts["real"] < 2 or self.counts["fake"] < 2:
            raise ValueError(f"FID needs at least 2 images on each side, got {self.counts['real']} real "
                             f"and {self.counts['fake']} fake")
        return float(self.metric.compute())


def frechet_distance(
    real: Iterable[Tensor],
    fake: Iterable[Tensor],
    extractor: nn.Module,
    device: str | torch.device = "cpu",
) -> float:
    """FID between the images of `real` and `fake` (iterables of uint8 NCHW batches); see `FrechetDistance`."""
    fid = FrechetDistance(extractor, device)
    for batch in real:
        fid.update(batch, real=True)
    for batch in fake:
        fid.update(batch, real=False)
    return fid.compute()
