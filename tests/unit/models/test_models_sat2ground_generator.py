"""sat2ground's stage-1 generator on its (nz, 4, 4) latent: it must be able to place content by
position and to vary with the latent, and every layer must get a gradient. A generator made of
stride-2 transposed convs straight on the latent (no projection layer) is translation-equivariant
on a stationary input: shifting the latent by one cell shifts the image by one cell's pixels, so it
cannot put sky above ground, and in training its output collapsed to flat grey."""
from __future__ import annotations

import pytest
import torch

from models.families.sat2ground import SpatialLatentGenerator
from models.registry import make_family

NZ, RES = 16, 32


@pytest.fixture
def generator() -> SpatialLatentGenerator:
    torch.manual_seed(0)
    return SpatialLatentGenerator(resolution=RES, channels=3, nz=NZ, ngf=16, max_channels=64)


def latents(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, NZ, 4, 4, generator=torch.Generator().manual_seed(seed))


def test_family_builds_it_for_both_stages(tmp_path):
    from models.snapshot import save_snapshot
    one = make_family("sat2ground", {"ngf": 8, "ndf": 8, "nz": NZ}, resolution=RES, channels=3, lr=2e-4)
    g = one.build()["G"]
    assert isinstance(g, SpatialLatentGenerator)
    assert g(latents(2)).shape == (2, 3, RES, RES)
    save_snapshot(tmp_path / "s1.pt", one, g)
    two = make_family("sat2ground", {"ngf": 8, "ndf": 8, "nz": NZ, "stage": 2, "generator_from": str(tmp_path / "s1.pt")},
                      resolution=RES, channels=3, lr=1e-3)
    net = two.build()["E"]
    assert isinstance(net.generator, SpatialLatentGenerator) and bool(net.generator_loaded)
    assert net.encoder(torch.zeros(2, 3, RES, RES)).shape == (2, NZ, 4, 4)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_output_varies_with_the_latent(generator, mode):
    if mode == "eval":   # sampling's mode: BatchNorm's running statistics, gathered first (plain averages)
        for m in generator.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        with torch.no_grad():
            for seed in range(1, 9):
                generator(latents(32, seed))
    generator.train(mode == "train")
    with torch.no_grad():
        x = generator(latents(32))
    assert x.shape == (32, 3, RES, RES)
    per_pixel_std = x.std(0)
    assert per_pixel_std.min() > 1e-3 and per_pixel_std.mean() > 0.05


def test_not_translation_equivariant(generator):
    """Shifting the latent by one cell must not just shift the image (8 px at 32²): each of the
    16 cells has its own weights, as DCGAN's 1x1 -> 4x4 projection gives. (The generator without
    a projection gave a difference of exactly 0 here.)"""
    generator.train()
    z = latents(8)
    cell = RES // 4
    with torch.no_grad():
        shifted = generator(torch.roll(z, 1, dims=-1))
        moved = torch.roll(generator(z), cell, dims=-1)
    # Compare away from the borders and the wrapped column, where even an equivariant net differs.
    inner = (..., slice(cell, RES - cell), slice(2 * cell, RES - cell))
    diff = (shifted[inner] - moved[inner]).abs().mean()
    scale = moved[inner].abs().mean()
    assert diff > 0.3 * scale, f"shifting the latent only shifts the image (diff {diff:.3g}, scale {scale:.3g})"


def test_every_layer_gets_a_gradient(generator):
    generator.train()
    generator(latents(8)).square().mean().backward()
    for name, p in generator.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_rejects_a_latent_of_the_wrong_shape(generator):
    with pytest.raises(ValueError, match="latent"):
        generator(torch.randn(2, NZ, 1, 1))
