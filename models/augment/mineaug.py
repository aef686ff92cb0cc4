"""MineAug at training time: the data set seen as N·(1+K) images, the N originals plus one copy
per chosen augmentation, each copy augmented on the fly with fresh random parameters.

Rather than materialising the copies, each sample drawn in epoch e carries the tag
(e + crc32(key)) mod (K+1): 0 shows the original, i shows augmentation i. Over any K+1
consecutive epochs every original is therefore shown once plain and once with each augmentation
(exactly the expanded set), and since the hash spreads keys evenly, about 1/(K+1) of every batch
is original.
"""
from __future__ import annotations

import zlib
from typing import Sequence

import torch
from torch import Tensor

from models.augment.pool import build_augmentation, draw_on


def stable_hash(key: str) -> int:
    """crc32 of the key: the same in every process and run (Python's hash() is salted per process)."""
    return zlib.crc32(key.encode("utf-8"))


class MineAugExpansion:
    def __init__(self, names: Sequence[str], channels: int):
        self.names = list(names)
        self.channels = channels
        # build_augmentation validates each name (unknown, or colour-only for grey).
        self.augmentations = [build_augmentation(n, channels) for n in self.names]
        self._device = torch.device("cpu")   # where the augmentations draw their parameters

    @property
    def k(self) -> int:
        return len(self.names)

    def tags(self, keys: Sequence[str], epoch: int) -> Tensor:
        """(len(keys),) int64: 0 = original, i = augmentation i (1-based) for this epoch."""
        return torch.tensor([(epoch + stable_hash(k)) % (self.k + 1) for k in keys], dtype=torch.long)

    @torch.no_grad()
    def __call__(self, images: Tensor, tags: Tensor) -> Tensor:
        """images: NCHW in [-1, 1] on any device; tags: (N,) from `tags`. Tagged images are
        augmented, one batched kornia call per augmentation; tag-0 images are returned as they were."""
        if tags.shape != (images.shape[0],):
            raise ValueError(f"expected one tag per image ({images.shape[0]}), got tags of shape {tuple(tags.shape)}")
        if self.k == 0:
            return images
        tags = tags.cpu()   # tags come from keys, on the host: choosing rows there needs no device sync
        if images.device != self._device:
            self.augmentations = [draw_on(aug, images.device) for aug in self.augmentations]
            self._device = images.device
        out = images.clone()
        for i, aug in enumerate(self.augmentations, start=1):
            idx = (tags == i).nonzero().flatten()
            if idx.numel() == 0:
                continue
            idx = idx.to(images.device, non_blocking=True)
            x01 = (images.index_select(0, idx).float() + 1) / 2
            y = aug(x01) * 2 - 1
            out.index_copy_(0, idx, y.to(images.dtype))
        return out

    def __repr__(self) -> str:
        return f"MineAugExpansion(names={self.names}, channels={self.channels})"
