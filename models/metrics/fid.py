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


def _check_batch(x: Tensor, side: str) -> None:
    if not isinstance(x, Tensor) or x.dtype != torch.uint8 or x.dim() != 4:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"{side} batches must be uint8 NCHW tensors in [0, 255], got {got}")


class FrechetDistance:
    """Streaming FID: add uint8 NCHW batches of either side in any order, then `compute()`.

    Only the running feature sums stay in memory. Needs at least two images on each side (a
    covariance of one sample is undefined). The extractor is moved to `device`. It does not
    synchronise across processes: use it where all the images are (e.g. rank 0), never from
    only some ranks of a process group.
    """

    def __init__(self, extractor: nn.Module, device: str | torch.device = "cpu"):
        if not hasattr(extractor, "num_features"):
            # Otherwise torchmetrics probes the module with a random 299x299 image to learn the width.
            raise TypeError("the extractor must have an int attribute `num_features`")
        self.metric = FrechetInceptionDistance(
            feature=extractor,
            normalize=False,            # our extractors take uint8 [0, 255]
            sync_on_compute=False,      # no collective calls: it may run on one rank of a process group
            dist_sync_on_step=False,
        ).to(device)
        self.device = device
        self.counts = {"real": 0, "fake": 0}

    @torch.no_grad()
    def update(self, batch: Tensor, *, real: bool) -> None:
        side = "real" if real else "fake"
        _check_batch(batch, side)
        if batch.shape[0] == 0:
            return
        self.metric.update(batch.to(self.device), real=real)
        self.counts[side] += batch.shape[0]

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
