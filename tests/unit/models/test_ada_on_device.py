"""ADA's controller on the device (`adjust_from_stats`) steps p as the host formula (`adjust`)
does, and the pipeline's exact 90° rotations and hue cross-product matrix, now made on the device
without host tensors, are what they were. MineAug's kornia transforms draw on the images' device."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.augment.ada import AdaptiveAugment
from models.augment.mineaug import MineAugExpansion


@pytest.mark.parametrize("stats", [(8.0, 8.0), (-8.0, 8.0), (4.8, 8.0), (0.0, 0.0), (3.0, 4.0)])
def test_adjust_from_stats_equals_the_host_controller(stats):
    host, device = AdaptiveAugment(1, target=0.6, speed_kimg=0.1, p=0.3), AdaptiveAugment(1, target=0.6,
                                                                                            speed_kimg=0.1, p=0.3)
    total, count = stats
    for _ in range(3):
        expected = host.adjust(total / count, 16) if count else host._p
        got = device.adjust_from_stats(torch.tensor([total, count]), 16)
        assert float(got) == pytest.approx(expected, abs=1e-6)
        assert device._p == pytest.approx(expected, abs=1e-6)   # the host mirror follows on the CPU


def test_p_gates_use_the_device_value_and_p_zero_skips():
    aug = AdaptiveAugment(3, p=0.0)
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    assert aug(x) is x
    aug.set_p(1.0)
    assert not torch.equal(aug(x), x)


def test_rotation_and_hue_matrices_are_exact():
    k = torch.arange(4)
    cos_k, sin_k = ((1 - k) * (k % 2 == 0)).float(), ((2 - k) * (k % 2 == 1)).float()
    assert cos_k.tolist() == [1.0, 0.0, -1.0, 0.0] and sin_k.tolist() == [0.0, 1.0, 0.0, -1.0]
    eye = torch.eye(3)
    r = 1 / math.sqrt(3)
    cross = r * (eye.roll(-1, dims=1) - eye.roll(1, dims=1))
    v = torch.full((3,), r)
    y = torch.randn(3)
    torch.testing.assert_close(cross @ y, torch.linalg.cross(v, y))   # [v]x y = v × y


class DrawRecorder(nn.Module):
    """Stands in for a kornia transform: records where it is told to draw; returns its input."""

    def __init__(self) -> None:
        super().__init__()
        self.draws_on = torch.device("cpu")

    def set_rng_device_and_dtype(self, device: torch.device, dtype: torch.dtype) -> None:
        self.draws_on = device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_mineaug_transforms_draw_on_the_images_device():
    expansion = MineAugExpansion(["Rotate", "HorizontalFlip"], channels=1)
    expansion.augmentations = [nn.Sequential(DrawRecorder()), DrawRecorder()]
    expansion(torch.zeros(2, 1, 8, 8), torch.tensor([1, 2]))
    assert [m.draws_on.type for aug in expansion.augmentations for m in aug.modules()
            if isinstance(m, DrawRecorder)] == ["cpu", "cpu"]
    # Meta stands in for a GPU: the images' device, which the transforms must draw on.
    out = expansion(torch.zeros(2, 1, 8, 8, device="meta"), torch.tensor([1, 2]))
    assert out.device.type == "meta"
    assert [m.draws_on.type for aug in expansion.augmentations for m in aug.modules()
            if isinstance(m, DrawRecorder)] == ["meta", "meta"]
