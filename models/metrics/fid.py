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


def frechet_distance(
    real: Iterable[Tensor],
    fake: Iterable[Tensor],
    extractor: nn.Module,
    device: str | torch.device = "cpu",
) -> float:
    """FID between the images of `real` and `fake` (iterables of uint8 NCHW batches).

    Batches are streamed: only the running feature sums stay in memory. Needs at least two
    images on each side (a covariance of one sample is undefined). The extractor is moved to
    `device`. The metric does not synchronise across processes: call it where all the images
    are (e.g. rank 0), never from only some ranks of a process group.
    """
    if not hasattr(extractor, "num_features"):
        # Otherwise torchmetrics probes the module with a random 299x299 image to learn the width.
        raise TypeError("the extractor must have an int attribute `num_features`")
    metric = FrechetInceptionDistance(
        feature=extractor,
        normalize=False,            # our extractors take uint8 [0, 255]
        sync_on_compute=False,      # no collective calls: it may run on one rank of a process group
        dist_sync_on_step=False,
    ).to(device)
    counts = {}
    with torch.no_grad():
        for side, batches in (("real", real), ("fake", fake)):
            counts[side] = 0
            for batch in batches:
                _check_batch(batch, side)
                if batch.shape[0] == 0:
                    continue
                metric.update(batch.to(device), real=side == "real")
                counts[side] += batch.shape[0]
    if counts["real"] < 2 or counts["fake"] < 2:
        raise ValueError(
            f"FID needs at least 2 images on each side, got {counts['real']} real and {counts['fake']} fake"
        )
    return float(metric.compute())
