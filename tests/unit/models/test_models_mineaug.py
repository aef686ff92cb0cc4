"""MineAug's expanded data set: tags cover every (original, augmentation) pair over K+1 epochs,
and tagged images are augmented while originals pass through untouched."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from models.augment.mineaug import MineAugExpansion, stable_hash

KEYS = [f"rosetta/{i:05d}" for i in range(300)]


def images(n: int, channels: int = 1, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=g) * 2 - 1


def test_stable_hash_is_crc32():
    assert stable_hash("a") == 0xE8B7BE43


def test_each_key_gets_every_tag_once_over_k_plus_1_epochs():
    ex = MineAugExpansion(["HorizontalFlip", "RandomAffine", "Rotate"], channels=1)
    assert ex.k == 3
    for start in (0, 5):
        seen = torch.stack([ex.tags(KEYS, e) for e in range(start, start + 4)], dim=1)   # (keys, epochs)
        assert seen.dtype == torch.long
        assert all(sorted(row) == [0, 1, 2, 3] for row in seen.tolist())


def test_about_one_in_k_plus_1_of_a_batch_is_original():
    ex = MineAugExpansion(["HorizontalFlip", "Translation_y", "Zoom_in"], channels=1)
    for epoch in range(4):
        counts = Counter(ex.tags(KEYS, epoch).tolist())
        assert set(counts) == {0, 1, 2, 3}
        assert abs(counts[0] / len(KEYS) - 0.25) < 0.06


def test_flip_tagged_images_are_flipped_originals_untouched():
    ex = MineAugExpansion(["HorizontalFlip"], channels=3)
    x = images(8, channels=3)
    tags = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    y = ex(x, tags)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y[tags == 0], x[tags == 0])
    # [-1, 1] -> [0, 1] -> flip -> [-1, 1] is exact up to rounding.
    assert torch.allclose(y[tags == 1], x[tags == 1].flip(3), atol=1e-6)


def test_output_range_dtype_and_fresh_parameters():
    ex = MineAugExpansion(["RandomAffine", "GaussianNoise"], channels=1)
    x = images(12)
    x[0] = 1.0   # noise would push these past the range
    x[1] = -1.0
    tags = torch.tensor([2, 2, 1, 1, 1, 1, 0, 0, 2, 2, 1, 2])
    y = ex(x, tags)
    assert -1 <= y.min() and y.max() <= 1
    assert torch.equal(y[6:8], x[6:8])
    assert not torch.allclose(y[2:6], x[2:6])
    assert not torch.allclose(y[2:6], ex(x, tags)[2:6])   # fresh parameters each call
    half = ex(x.half(), tags)
    assert half.dtype == torch.float16 and torch.equal(half[6:8], x.half()[6:8])


def test_empty_names_is_identity():
    ex = MineAugExpansion([], channels=1)
    assert ex.tags(KEYS, 3).eq(0).all()
    x = images(4)
    assert torch.equal(ex(x, ex.tags(KEYS[:4], 0)), x)


def test_names_are_validated():
    with pytest.raises(ValueError, match="allowed"):
        MineAugExpansion(["HorizontalFlip", "Twirl"], channels=1)
    with pytest.raises(ValueError, match="3-channel"):
        MineAugExpansion(["RGBShift"], channels=1)
    ex = MineAugExpansion(["HorizontalFlip"], channels=1)
    with pytest.raises(ValueError, match="one tag per image"):
        ex(images(4), torch.zeros(3, dtype=torch.long))
