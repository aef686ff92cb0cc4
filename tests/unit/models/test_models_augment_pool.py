"""The MineAug candidate pool: every entry builds, keeps shape and range, and changes pixels."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.augment.pool import COLOUR_ONLY, POOL_NAMES, apply_uint8, build_augmentation, mse_pm1, names_for

# Moves pixels by a small fraction of a pixel (kornia reads the listed shear in degrees).
NEAR_IDENTITY = {"Shear"}


def textured(n: int, channels: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth fields plus fine noise in [0, 1]: blurs and sharpening have detail to act on."""
    g = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.rand(n, channels, 4, 4, generator=g), size=size, mode="bilinear", align_corners=False)
    return (0.8 * smooth + 0.2 * torch.rand(n, channels, size, size, generator=g)).clamp(0, 1)


def test_pool_table():
    assert len(POOL_NAMES) == 31 and len(set(POOL_NAMES)) == 31
    assert POOL_NAMES[:3] == ("Translation_x", "Translation_y", "Translation_both")
    assert POOL_NAMES[-5:] == COLOUR_ONLY
    assert names_for(3) == list(POOL_NAMES)
    assert names_for(1) == list(POOL_NAMES[:-5])


@pytest.mark.parametrize("channels", [1, 3])
def test_every_entry_keeps_shape_range_and_changes_pixels(channels):
    torch.manual_seed(0)
    x = textured(4, channels)
    for name in names_for(channels):
        y = build_augmentation(name, channels)(x)
        assert y.shape == x.shape and y.dtype == x.dtype, name
        assert 0 <= y.min() and y.max() <= 1, name
        change = (y - x).abs().mean().item()
        if name in NEAR_IDENTITY:
            assert change < 0.01, name
        else:
            assert change > 1e-3, f"{name} left the images (almost) unchanged: {change}"


def test_fresh_parameters_per_image_and_per_call():
    x = textured(1, 1).expand(4, -1, -1, -1)
    rot = build_augmentation("Rotate", 1)
    y = rot(x)
    assert not torch.allclose(y[0], y[1])   # same_on_batch=False
    assert not torch.allclose(y, rot(x))


def test_exact_flips_and_invert():
    x = textured(4, 1)
    assert torch.equal(build_augmentation("HorizontalFlip", 1)(x), x.flip(3))
    assert torch.equal(build_augmentation("VerticalFlip", 1)(x), x.flip(2))
    assert torch.allclose(build_augmentation("Invert", 1)(x), 1 - x)


def test_half_precision_is_computed_in_float32():
    y = build_augmentation("Rotate", 3)(textured(2, 3).half())
    assert y.dtype == torch.float16


def test_errors_name_the_allowed_entries():
    with pytest.raises(ValueError, match="unknown augmentation 'Twirl'.*Translation_x.*RGBShift"):
        build_augmentation("Twirl", 3)
    with pytest.raises(ValueError, match="ColorJiggle.*3-channel"):
        build_augmentation("ColorJiggle", 1)
    with pytest.raises(ValueError, match="3-channel"):
        build_augmentation("Rotate", 3)(textured(2, 1))


def test_apply_uint8_is_seeded_and_leaves_the_global_rng_alone():
    imgs = (textured(6, 1) * 255).round().to(torch.uint8)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = apply_uint8("RandomAffine", imgs, 1, generator_seed=7)
    after = torch.rand(3)
    assert torch.equal(before, after)
    b = apply_uint8("RandomAffine", imgs, 1, generator_seed=7)
    c = apply_uint8("RandomAffine", imgs, 1, generator_seed=8)
    assert a.dtype == torch.uint8 and a.shape == imgs.shape
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(apply_uint8("RandomAffine", imgs, 1, generator_seed=7, chunk=4),
                       apply_uint8("RandomAffine", imgs, 1, generator_seed=7, chunk=4))
    assert torch.equal(apply_uint8("HorizontalFlip", imgs, 1, generator_seed=0), imgs.flip(3))


def test_mse_pm1():
    imgs = (textured(5, 3) * 255).round().to(torch.uint8)
    assert mse_pm1(imgs, imgs) == 0
    black, white = torch.zeros_like(imgs), torch.full_like(imgs, 255)
    assert mse_pm1(black, white) == pytest.approx(4.0)   # -1 vs 1
    # Per-image means, then their mean; chunking does not change it.
    half = imgs.clone()
    half[:2] = 255 - half[:2]
    assert mse_pm1(half, imgs, chunk=2) == pytest.approx(mse_pm1(half, imgs), rel=1e-9)
    with pytest.raises(ValueError, match="one shape"):
        mse_pm1(imgs, imgs[:3])
