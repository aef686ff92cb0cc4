"""Improved precision and recall (Kynkäänniemi et al., 2019) of generated images against real ones.

Each set's manifold is approximated by balls around its feature vectors, of radius the distance
to the k-th nearest neighbour in the same set (k = 3, as StyleGAN2-ADA's pr50k3). Precision is
the fraction of generated features inside some real ball (fidelity); recall the fraction of real
features inside some generated ball (coverage). Distances are taken in row blocks, so 50k x 50k
needs only a block of rows at a time. Published values use VGG-16 features (`VGG16Extractor`);
values in another feature space are on their own scale.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from models.metrics.extractors import FeatureStore

K_NEAREST = 3
ROW_BATCH = 1024


def knn_radii(feats: Tensor, k: int = K_NEAREST, row_batch: int = ROW_BATCH) -> Tensor:
    """(N,) distance of each feature to its k-th nearest neighbour in `feats`, itself excluded."""
    radii = []
    for s in range(0, feats.shape[0], row_batch):
        d = torch.cdist(feats[s:s + row_batch], feats)
        # The (k+1)-th smallest: the smallest is the point itself, at distance 0.
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def coverage(queries: Tensor, refs: Tensor, ref_radii: Tensor, row_batch: int = ROW_BATCH) -> float:
    """Fraction of `queries` within ref_radii[j] of some refs[j]."""
    inside = []
    for s in range(0, queries.shape[0], row_batch):
        d = torch.cdist(queries[s:s + row_batch], refs)
        inside.append((d <= ref_radii.unsqueeze(0)).any(dim=1))
    return torch.cat(inside).float().mean().item()


def precision_recall_from_features(real: Tensor, fake: Tensor, *, k: int = K_NEAREST, row_batch: int = ROW_BATCH,
                                   device: str | torch.device = "cpu") -> tuple[float, float]:
    """(precision, recall) of the `fake` features (N, d) against the `real` ones (M, d)."""
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than {k} images on each side, got "
                         f"{real.shape[0]} real and {fake.shape[0]} fake")
    real, fake = real.to(device, torch.float32), fake.to(device, torch.float32)
    precision = coverage(fake, real, knn_radii(real, k, row_batch), row_batch)
    recall = coverage(real, fake, knn_radii(fake, k, row_batch), row_batch)
    return precision, recall


class PrecisionRecall(FeatureStore):
    """Streaming precision/recall: add uint8 NCHW batches of either side in any order, then
    `compute()` -> {"precision", "recall"}. Keeps every feature on the CPU; the distances are
    computed on `device`. Like `FrechetDistance`, it does not synchronise across processes.
    """

    def __init__(self, extractor: nn.Module, device: str | torch.device = "cpu", *, k: int = K_NEAREST,
                 row_batch: int = ROW_BATCH):
        super().__init__(extractor, device)
        self.k, self.row_batch = k, row_batch

    def compute(self) -> dict[str, float]:
        p, r = precision_recall_from_features(self.side("real"), self.side("fake"), k=self.k,
                                              row_batch=self.row_batch, device=self.device)
        return {"precision": p, "recall": r}

