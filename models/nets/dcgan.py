"""DCGAN's networks (Radford et al. 2016) for any power-of-two resolution >= 8.

Generator: noise (N, nz, 1, 1) -> 4x4 by one transposed conv, then stride-2 transposed convs
with BatchNorm + ReLU that double the size and halve the channels down to `ngf`, and a last
transposed conv to the image channels with Tanh. Discriminator: the mirror image, stride-2 convs
with LeakyReLU(0.2) (BatchNorm on all but the first) down to 4x4, then a 4x4 conv to one logit.
At 64x64 with the default widths this is exactly the network of the paper and the PyTorch example.
The helpers (`dcgan_init_`, `down_stack`, ...) are shared by the pix2pix and sat2ground networks.
"""
from __future__ import annotations

import operator

import torch
from torch import nn


def num_stages(resolution: int) -> int:
    """Stride-2 stages between 4x4 and `resolution` (4 at 64x64); rejects what DCGAN cannot build."""
    try:
        r = operator.index(resolution)
    except TypeError:
        r = 0
    if r < 8 or r & (r - 1):
        raise ValueError(
            f"data.resolution must be a power of two >= 8 for the dcgan family, got {resolution!r}"
        )
    return r.bit_length() - 1 - 2   # log2(resolution) - log2(4)


def doubling_widths(base: int, stages: int, cap: int) -> list[int]:
    """base, 2*base, 4*base, ... (one per stage), each capped at `cap`."""
    return [min(base * 2**i, cap) for i in range(stages)]


def dcgan_init_(module: nn.Module) -> None:
    """DCGAN initialisation: conv weights N(0, 0.02), BatchNorm weights N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def up_block(c_in: int, c_out: int) -> list[nn.Module]:
    """Doubles the size: a stride-2 transposed conv, BatchNorm, ReLU. Convs followed by BatchNorm
    carry no bias: BN's shift makes it redundant."""
    return [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)]


def down_stack(channels: int, widths: list[int]) -> list[nn.Module]:
    """Stride-2 convs with LeakyReLU(0.2), one per width, halving the size each time; BatchNorm on
    all but the first (as in the paper: the first block sees raw pixels)."""
    layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
    for c_in, c_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, True)]
    return layers


class DCGANGenerator(nn.Module):
    """Noise (N, nz, s, s) -> image. `latent_size` 1: DCGAN's noise vector, projected to 4x4 by a
    stride-1 transposed conv; 4: a spatial 4x4 latent that stride-2 transposed convs grow from
    directly (the satellite->ground generator)."""

    def __init__(self, *, resolution: int, channels: int, nz: int = 100, ngf: int = 64, max_channels: int = 512,
                 latent_size: int = 1):
        super().__init__()
        if latent_size not in (1, 4):
            raise ValueError(f"latent_size must be 1 or 4, got {latent_size}")
        stages = num_stages(resolution)
        self.nz, self.latent_size = nz, latent_size
        # Widest at 4x4, halving towards the image: e.g. 512, 256, 128, 64 at 64x64 (latent_size 1).
        widths = doubling_widths(ngf, stages if latent_size == 1 else stages - 1, max_channels)[::-1]
        layers: list[nn.Module] = []
        c_in = nz
        if latent_size == 1:
            layers += [nn.ConvTranspose2d(nz, widths[0], 4, 1, 0, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(True)]
            c_in, widths = widths[0], widths[1:]
        for c_out in widths:
            layers += up_block(c_in, c_out)
            c_in = c_out
        layers += [nn.ConvTranspose2d(c_in, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)
        dcgan_init_(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() == 2 and self.latent_size == 1:   # accept (N, nz) as well as (N, nz, 1, 1)
            z = z[:, :, None, None]
        return self.main(z)


class DCGANDiscriminator(nn.Module):
    def __init__(self, *, resolution: int, channels: int, ndf: int = 64, max_channels: int = 512):
        super().__init__()
        widths = doubling_widths(ndf, num_stages(resolution), max_channels)   # e.g. 64, 128, 256, 512 at 64x64
        layers = down_stack(channels, widths) + [nn.Conv2d(widths[-1], 1, 4, 1, 0, bias=False)]   # 4x4 -> one logit
        self.main = nn.Sequential(*layers)
        dcgan_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x).reshape(-1)   # (N,) logits
