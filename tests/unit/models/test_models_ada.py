"""ADA: identity at p=0, differentiable augmentation at p>0, and the p controller."""
from __future__ import annotations

import math

import pytest
import torch

from models.augment.ada import AdaptiveAugment, _rotate2d, _scale2d, _translate2d


def images(n=4, c=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, size, size, generator=g) * 2 - 1


def test_p0_is_identity():
    x = images()
    out = AdaptiveAugment(3)(x)
    assert torch.equal(out, x)


@pytest.mark.parametrize("channels", [1, 3])
def test_p1_changes_images_and_is_differentiable(channels):
    torch.manual_seed(0)
    x = images(c=channels).requires_grad_(True)
    out = AdaptiveAugment(channels, p=1.0)(x)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    assert not torch.allclose(out, x, atol=1e-3)
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_dtype_preserved_bf16():
    torch.manual_seed(0)
    x = images(c=1).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = AdaptiveAugment(1, p=0.5)(x)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape


def test_deterministic_under_seed():
    aug, x = AdaptiveAugment(3, p=0.7), images()
    torch.manual_seed(3)
    a = aug(x)
    torch.manual_seed(3)
    b = aug(x)
    assert torch.equal(a, b)
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert torch.equal(aug(x, generator=gen()), aug(x, generator=gen()))


def test_blit_warps_are_exact():
    """Flips, 90-degree turns and whole-pixel shifts land on pixel centres: no interpolation."""
    x = images(n=1, size=8)
    one, zero = torch.ones(1), torch.zeros(1)
    warp = AdaptiveAugment._warp
    assert torch.allclose(warp(x, _scale2d(-one, one)), x.flip(3), atol=1e-5)
    turned = warp(x, _rotate2d(zero, one))
    assert any(torch.allclose(turned, x.rot90(k, dims=(2, 3)), atol=1e-5) for k in (1, 3))
    shifted = warp(x, _translate2d(2 * one / 8, zero))           # one pixel
    assert torch.allclose(shifted[..., :-1], x[..., 1:], atol=1e-5)


def test_state_dict_holds_p():
    aug = AdaptiveAugment(3, p=0.25)
    sd = aug.state_dict()
    assert set(sd) == {"p"} and sd["p"].item() == 0.25
    other = AdaptiveAugment(3)
    other.load_state_dict(sd)
    assert other.p.item() == 0.25


def test_stats_and_controller():
    aug = AdaptiveAugment(1, target=0.6, interval=4, speed_kimg=0.5)
    batch = 16
    images_per_adjust = batch * aug.interval
    ps = []
    for _ in range(5):                          # an overfitting D: every real called real
        for _ in range(aug.interval):
            aug.observe(torch.rand(batch, 1) + 0.1)
        total, count = aug.take_stats().tolist()
        assert count == images_per_adjust and total == images_per_adjust
        ps.append(aug.adjust(total / count, images_per_adjust))
    assert ps == sorted(ps) and ps[0] > 0
    assert math.isclose(ps[0], images_per_adjust / 500, rel_tol=1e-6)
    assert aug.take_stats().tolist() == [0.0, 0.0]   # reset by the previous take
    for _ in range(20):                         # D unsure of the reals: p falls to 0
        aug.observe(-torch.rand(batch, 1) - 0.1)
        total, count = aug.take_stats().tolist()
        last = aug.adjust(total / count, images_per_adjust)
    assert last == 0.0 and aug.p.item() == 0.0
    for _ in range(100):
        last = aug.adjust(1.0, images_per_adjust)
    assert last == 1.0                            # clamped to [0, 1]


def test_loaded_p_takes_effect():
    """A checkpoint's p is the one the next forward uses (the module keeps a host copy of it)."""
    src, dst = AdaptiveAugment(1, p=1.0), AdaptiveAugment(1)
    x = images(c=1)
    assert torch.equal(dst(x), x)
    dst.load_state_dict(src.state_dict())
    torch.manual_seed(0)
    assert not torch.allclose(dst(x), x, atol=1e-3)
