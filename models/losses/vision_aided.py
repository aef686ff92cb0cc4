"""The trainable part of the vision-aided discriminator (Kumari et al., CVPR 2022; MINEAUG.md §2).

Per backbone, as the reference's `get_decoder`: a multilevel backbone (CLIP, DINO) gets one small
head per feature level: its map levels (ViT tokens (N, L, C)) a conv head giving one logit per
location (N, k), its pooled vector (the last level) an MLP giving one logit (N,); a single-level
backbone (Swin, VGG) gets one head on its one map (N, C, H, W) giving one logit (N,). The loss of a head is BCE-with-logits summed
over its levels ("multilevel_sigmoid"), with optional one-sided label smoothing of the reals.

Also the linear probe that picks which backbone to add next: a logistic regression on pooled
features, scored by held-out accuracy (the backbone that best tells reals from fakes).
"""
from __future__ import annotations

import math
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from models.nets.vision_backbones import is_multilevel


def _sn(module: nn.Module, on: bool) -> nn.Module:
    return spectral_norm(module) if on else module


class MapHead(nn.Module):
    """A feature map -> one logit per location of a half-resolution grid, (N, k)."""

    def __init__(self, channels: int, hidden: int = 256, *, spectral: bool = True):
        super().__init__()
        hidden = min(hidden, channels)
        self.net = nn.Sequential(
            _sn(nn.Conv2d(channels, hidden, 1), spectral), nn.LeakyReLU(0.2),
            _sn(nn.Conv2d(hidden, hidden, 3, stride=2, padding=1), spectral), nn.LeakyReLU(0.2),
            _sn(nn.Conv2d(hidden, 1, 1), spectral))

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 3:   # tokens (N, L, C): back onto their square patch grid
            n, length, c = x.shape
            side = math.isqrt(length)
            h, w = (side, side) if side * side == length else (length, 1)
            x = x.transpose(1, 2).reshape(n, c, h, w)
        elif x.ndim != 4:
            raise ValueError(f"map head: expected (N, L, C) tokens or (N, C, H, W) maps, got {tuple(x.shape)}")
        # Backbone residual streams carry a few channels of huge magnitude; normalising each
        # location keeps the logits of every backbone in the same range.
        x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2]).permute(0, 3, 1, 2)
        return self.net(x).flatten(1)


class ImageHead(nn.Module):
    """A feature map -> one logit per image, (N,): the reference's `SimpleD` for single-level
    backbones (an unpadded 3x3 stride-2 conv, 7x7 -> 3x3, then an MLP on the flattened grid)."""

    GRID = 3

    def __init__(self, channels: int, hidden: int = 256, *, spectral: bool = True):
        super().__init__()
        hidden = min(hidden, channels)
        # The pool is the identity on the published backbones' 7x7 maps; it lets the tiny test
        # backbones' smaller maps (padded to 3x3 first, in forward) reach the same grid.
        self.conv = nn.Sequential(_sn(nn.Conv2d(channels, hidden, 3, stride=2), spectral), nn.LeakyReLU(0.2),
                                  nn.AdaptiveAvgPool2d(self.GRID))
        self.mlp = nn.Sequential(_sn(nn.Linear(hidden * self.GRID ** 2, hidden), spectral), nn.LeakyReLU(0.2),
                                 _sn(nn.Linear(hidden, 1), spectral))

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"image head: expected (N, C, H, W) maps, got {tuple(x.shape)}")
        x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2]).permute(0, 3, 1, 2)   # as MapHead
        if min(x.shape[-2:]) < 3:
            x = F.pad(x, (0, max(0, 3 - x.shape[-1]), 0, max(0, 3 - x.shape[-2])))
        return self.mlp(self.conv(x).flatten(1)).squeeze(1)


class VectorHead(nn.Module):
    """A pooled (N, C) vector -> one logit, (N,)."""

    def __init__(self, channels: int, hidden: int = 256, *, spectral: bool = True):
        super().__init__()
        hidden = min(hidden, channels)
        self.net = nn.Sequential(_sn(nn.Linear(channels, hidden), spectral), nn.LeakyReLU(0.2),
                                 _sn(nn.Linear(hidden, 1), spectral))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1)).squeeze(1)


class VisionAidedHeads(nn.Module):
    """Heads for each backbone: `level_dims[kind]` = channels per level, or a backbone (anything
    with `level_dims`); `is_multilevel(kind)` says whether the last level is pooled (CLIP, DINO) or
    the one level a map (Swin, VGG)."""

    def __init__(self, level_dims: Mapping[str, Sequence[int] | nn.Module], *, hidden: int = 256,
                 spectral: bool = True):
        super().__init__()
        dims = {k: list(getattr(v, "level_dims", v)) for k, v in level_dims.items()}
        for kind, d in dims.items():
            if len(d) < 1:
                raise ValueError(f"vision-aided heads: backbone {kind!r} has no feature levels")
        self.heads = nn.ModuleDict({kind: self._heads_of(kind, d, hidden, spectral) for kind, d in dims.items()})

    @staticmethod
    def _heads_of(kind: str, dims: list[int], hidden: int, spectral: bool) -> nn.ModuleList:
        if not is_multilevel(kind):
            if len(dims) != 1:
                raise ValueError(f"vision-aided heads: {kind!r} is single-level, got {len(dims)} levels")
            return nn.ModuleList([ImageHead(dims[0], hidden, spectral=spectral)])
        return nn.ModuleList([MapHead(c, hidden, spectral=spectral) for c in dims[:-1]]
                             + [VectorHead(dims[-1], hidden, spectral=spectral)])

    def forward(self, features: Mapping[str, Sequence[Tensor]]) -> dict[str, list[Tensor]]:
        out = {}
        for kind, levels in features.items():
            heads = self.heads[kind]
            if len(levels) != len(heads):
                raise ValueError(f"vision-aided heads of {kind!r}: {len(heads)} levels expected, got {len(levels)}")
            out[kind] = [head(x) for head, x in zip(heads, levels)]
        return out

    def parameters_of(self, kind: str) -> Iterator[nn.Parameter]:
        return self.heads[kind].parameters()


# ---- losses ("multilevel_sigmoid") ----------------------------------------------------------------
def head_loss(logits_levels: Sequence[Tensor], real: bool, label_smooth: float = 0.0) -> Tensor:
    """Σ over levels of mean BCE-with-logits against 1 − label_smooth (real) or 0 (fake)."""
    if not 0 <= label_smooth < 1:
        raise ValueError(f"label_smooth must be in [0, 1), got {label_smooth}")
    target = 1.0 - label_smooth if real else 0.0   # one-sided: fakes keep target 0
    return sum(F.binary_cross_entropy_with_logits(x, torch.full_like(x, target)) for x in logits_levels)


def _per_backbone(logits: Mapping[str, Sequence[Tensor]] | Sequence[Tensor]) -> list[Sequence[Tensor]]:
    return list(logits.values()) if isinstance(logits, Mapping) else [logits]


def d_loss(real_logits: Mapping[str, Sequence[Tensor]] | Sequence[Tensor],
           fake_logits: Mapping[str, Sequence[Tensor]] | Sequence[Tensor], label_smooth: float = 0.0) -> Tensor:
    """Σ_k [L_k(real, 1) + L_k(fake, 0)] over backbones k (a dict) or one backbone's levels (a list)."""
    reals, fakes = _per_backbone(real_logits), _per_backbone(fake_logits)
    if len(reals) != len(fakes) or not reals:
        raise ValueError(f"vision-aided d_loss: {len(reals)} real and {len(fakes)} fake backbones")
    return sum(head_loss(r, True, label_smooth) + head_loss(f, False) for r, f in zip(reals, fakes))


def g_loss(fake_logits: Mapping[str, Sequence[Tensor]] | Sequence[Tensor], label_smooth: float = 0.0) -> Tensor:
    """Σ_k L_k(fake, 1 − label_smooth): the generator wants every head to call its images real, with
    the same smoothed target the heads learn for reals (as the vision-aided reference)."""
    fakes = _per_backbone(fake_logits)
    if not fakes:
        raise ValueError("vision-aided g_loss: no backbone logits")
    return sum(head_loss(f, True, label_smooth) for f in fakes)


# ---- the linear probe ---------------------------------------------------------------------------
def _matrix(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(len(x), -1)


PROBE_C = 0.2            # the reference's logistic-regression regularisation
PROBE_MAX_ITER = 5000


def probe_accuracy(real_feats: Tensor | np.ndarray, fake_feats: Tensor | np.ndarray, *, repeats: int = 3,
                   seed: int = 0, test_size: float = 0.5) -> float:
    """Held-out accuracy of a logistic regression telling real from fake pooled features,
    averaged over `repeats` stratified splits (0.5: indistinguishable, 1: separable).

    The vision-aided GAN reference's probe: half of each side to fit, half to score, C = 0.2 on the
    features as the backbone gives them (no rescaling), three repeats."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedShuffleSplit

    real, fake = _matrix(real_feats), _matrix(fake_feats)
    if min(len(real), len(fake)) < 4:
        raise ValueError(f"linear probe needs >= 4 real and 4 fake samples, got {len(real)} and {len(fake)}")
    x = np.concatenate([real, fake])
    y = np.concatenate([np.ones(len(real), dtype=int), np.zeros(len(fake), dtype=int)])
    splits = StratifiedShuffleSplit(n_splits=repeats, test_size=test_size, random_state=seed)
    scores = []
    for train, test in splits.split(x, y):
        clf = LogisticRegression(C=PROBE_C, max_iter=PROBE_MAX_ITER, random_state=0)
        clf.fit(x[train], y[train])
        scores.append(clf.score(x[test], y[test]))
    return float(np.mean(scores))


def choose_backbone(pooled_by_kind: Mapping[str, tuple[Tensor, Tensor]], exclude: Sequence[str] = (), *,
                    repeats: int = 3, seed: int = 0) -> tuple[str, dict[str, float]]:
    """The kind (not in `exclude`) whose pooled (real, fake) features the probe separates best,
    and every probed kind's accuracy; ties go to the earlier kind."""
    accuracies = {kind: probe_accuracy(real, fake, repeats=repeats, seed=seed)
                  for kind, (real, fake) in pooled_by_kind.items() if kind not in exclude}
    if not accuracies:
        raise ValueError(f"choose_backbone: no candidates left (given {list(pooled_by_kind)}, "
                         f"excluded {list(exclude)})")
    best = max(accuracies, key=accuracies.__getitem__)   # max keeps the first of equals
    return best, accuracies
