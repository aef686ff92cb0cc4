"""Execute + Select for one candidate (MINEAUG.md §1), repeated with fresh random parameters.

Pure computation, no Ray: a Tune trial calls `score_candidate`, and so does the serial
reference computation the tests compare the trials against.
"""
from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from models.augment.pool import apply_uint8, mse_pm1
from search.frechet import Reference
from search.kid import kid_with_std
from search.originals import Originals, extract


def repeat_seed(search_seed: int, candidate: str, repeat: int) -> int:
    """The augmentation seed of one (candidate, repeat): a stable hash (crc32, not Python's
    salted hash()), so reruns and resumed searches draw the same parameters on any machine."""
    return zlib.crc32(f"mineaug/{search_seed}/{candidate}/{repeat}".encode("utf-8"))


def spread(values) -> float:
    """Sample standard deviation over repeats (0 for one repeat)."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.std(ddof=1)) if v.size > 1 else 0.0


@dataclass
class CandidateScore:
    name: str
    fids: list[float]                   # FID(augmented copy, originals), one per repeat
    mses: list[float]                   # pixel MSE in [-1, 1], images matched by key, one per repeat
    features: list[np.ndarray] = field(repr=False, default_factory=list)   # float32 (N, d) per repeat
    seconds: float = 0.0
    kids: list[float] = field(default_factory=list)   # KID(augmented copy, originals), one per repeat

    @property
    def fid(self) -> float:
        return float(np.mean(self.fids))

    @property
    def fid_std(self) -> float:
        return spread(self.fids)

    @property
    def kid(self) -> float:
        return float(np.mean(self.kids)) if self.kids else float("nan")

    @property
    def kid_std(self) -> float:
        """Spread over repeats, as fid_std (KID's own subset spread is 0 for sets of <= 1000 images)."""
        return spread(self.kids) if self.kids else float("nan")

    @property
    def mse(self) -> float:
        return float(np.mean(self.mses))

    @property
    def mse_std(self) -> float:
        return spread(self.mses)


def augmented_copy(name: str, originals: Originals, search_seed: int, repeat: int,
                   device: str | torch.device = "cpu", images: torch.Tensor | None = None) -> torch.Tensor:
    """Every original with `name` applied once (probability 1), in the originals' order (and keys).
    `images`: the originals' pixels already on `device` (a caller with several repeats moves them once)."""
    images = originals.images.to(device) if images is None else images
    return apply_uint8(name, images, originals.channels, repeat_seed(search_seed, name, repeat)).cpu()


def score_candidate(name: str, originals: Originals, extractor: torch.nn.Module, repeats: int, search_seed: int,
                    reference: Reference | None = None, device: str | torch.device = "cpu") -> CandidateScore:
    """FID and MSE of `name` for each repeat, keeping every repeat's augmented features."""
    start = time.perf_counter()
    reference = reference or Reference(originals.features)
    extractor = extractor.to(device).eval()
    # One transfer per trial, not per repeat: a trial sharing a GPU under a memory cap (search.gpu_share)
    # holds one device copy of the originals, and the host does not copy the whole set each repeat.
    on_device = originals.images.to(device)
    fids, mses, feats = [], [], []
    for r in range(repeats):
        aug = augmented_copy(name, originals, search_seed, r, device, images=on_device)
        f = extract(extractor, aug, device)
        feats.append(f)
        fids.append(reference.fid(reference.stats(f)))
        # apply_uint8 keeps row order, so row i is the copy of key i: matched by key by construction.
        mses.append(mse_pm1(aug, originals.images))
    kids = [kid_with_std(originals.features, f)[0] for f in feats]
    return CandidateScore(name, fids, mses, feats, time.perf_counter() - start, kids)


def with_kids(score: CandidateScore, originals_features: np.ndarray,
              features: Callable[[str], list[np.ndarray]] | None = None) -> CandidateScore:
    """`score` with its per-repeat KIDs, computed from its stored features when it was stored without
    them: the score's own, else `features(score.name)` (read for this candidate only, then dropped)."""
    if not score.kids:
        feats = score.features or (features(score.name) if features else [])
        score.kids = [kid_with_std(originals_features, f)[0] for f in feats]
    return score
