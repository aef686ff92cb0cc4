"""The TrivialAugment-style control of the MineAug search's stage 2, as training batches.

Every image of every batch, each time it is drawn, gets one augmentation chosen uniformly among
the kept candidates (TrivialAugment, Müller & Hutter 2021, over the search's pool instead of its
own). Unlike MineAug's expansion no image is shown plain: the control asks whether a uniform mix
of every kept candidate does as well as a chosen subset. The draw uses torch's generator, which
`run_steps` reseeds from (seed, rank, step) before each batch, so a proxy run is reproducible.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from models.augment.pool import build_augmentation


class TrivialAugmentBatches:
    def __init__(self, batches: Iterator[dict], names: Sequence[str], channels: int):
        if not names:
            raise ValueError("the TrivialAugment-style control needs at least one kept candidate")
        self.batches, self.names = batches, list(names)
        self.augmentations = [build_augmentation(n, channels) for n in self.names]

    def __iter__(self) -> "TrivialAugmentBatches":
        return self

    @torch.no_grad()
    def __next__(self) -> dict:
        batch = dict(next(self.batches))
        images = batch["image"]
        choice = torch.randint(len(self.augmentations), (images.shape[0],))
        out = images.clone()
        for i, aug in enumerate(self.augmentations):
            idx = (choice == i).nonzero().flatten()
            if idx.numel():
                idx = idx.to(images.device)
                y = aug((images.index_select(0, idx).float() + 1) / 2) * 2 - 1
                out.index_copy_(0, idx, y.to(images.dtype))
        batch["image"] = out
        return batch
