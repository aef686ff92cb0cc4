"""The `dcgan` family: DCGAN (Radford et al. 2016) for any power-of-two resolution >= 8.

Generator: noise (N, nz, 1, 1) -> 4x4 by one transposed conv, then stride-2 transposed convs
with BatchNorm + ReLU that double the size and halve the channels down to `ngf`, and a last
transposed conv to the image channels with Tanh. Discriminator: the mirror image, stride-2 convs
with LeakyReLU(0.2) (BatchNorm on all but the first) down to 4x4, then a 4x4 conv to one logit.
At 64x64 with the default widths this is exactly the network of the paper and the PyTorch example.
"""
from __future__ import annotations

import operator
from typing import Mapping

import torch
from pydantic import Field
from torch import nn

from models.adversarial import TwoPlayerConfig, discriminator_loss, generator_loss, two_player_phases
from models.family import Family, Phase, StepContext, register_family, run_in_eval


class DCGANConfig(TwoPlayerConfig):
    """The `model:` section of a dcgan spec; defaults are the paper's."""

    nz: int = Field(100, gt=0, description="length of the noise vector")
    ngf: int = Field(64, gt=0, description="generator width at the last up-block")
    ndf: int = Field(64, gt=0, description="discriminator width at the first down-block")
    max_channels: int = Field(512, gt=0, description="cap on the width of any block (large resolutions)")


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


class Generator(nn.Module):
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


class Discriminator(nn.Module):
    def __init__(self, *, resolution: int, channels: int, ndf: int = 64, max_channels: int = 512):
        super().__init__()
        widths = doubling_widths(ndf, num_stages(resolution), max_channels)   # e.g. 64, 128, 256, 512 at 64x64
        layers = down_stack(channels, widths) + [nn.Conv2d(widths[-1], 1, 4, 1, 0, bias=False)]   # 4x4 -> one logit
        self.main = nn.Sequential(*layers)
        dcgan_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x).reshape(-1)   # (N,) logits


@register_family
class DCGAN(Family):
    name = "dcgan"
    config_cls = DCGANConfig
    conditional = False
    metrics = ("fid",)
    sampler_role = "G"

    config: DCGANConfig

    def __init__(self, config: DCGANConfig, *, resolution: int, channels: int, lr: float):
        super().__init__(config, resolution=resolution, channels=channels, lr=lr)
        num_stages(resolution)   # fail at spec validation time, not at the first build
        if channels < 1:
            raise ValueError(f"data.channels must be >= 1, got {channels}")

    def build(self) -> dict[str, nn.Module]:
        c = self.config
        return {
            "G": Generator(resolution=self.resolution, channels=self.channels, nz=c.nz, ngf=c.ngf,
                           max_channels=c.max_channels),
            "D": Discriminator(resolution=self.resolution, channels=self.channels, ndf=c.ndf,
                               max_channels=c.max_channels),
        }

    def phases(self) -> list[Phase]:
        return two_player_phases(self.config, self.lr)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """Shape of one noise sample."""
        return (self.config.nz, 1, 1)

    def _noise(self, n: int, ctx: StepContext) -> torch.Tensor:
        # ctx.generator, when given, must live on ctx.device (torch.randn's rule).
        return torch.randn(n, *self.latent_shape, device=ctx.device, generator=ctx.generator)

    def loss(self, batch: Mapping[str, torch.Tensor], ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        real = batch["image"]
        z = self._noise(real.shape[0], ctx)
        if ctx.phase == "D":
            with torch.no_grad():   # G is not trained in this phase: no graph through it
                fake = ctx.net("G")(z)
            d = ctx.net("D")
            # Separate forward calls: BatchNorm normalises real and fake batches apart, as in DCGAN.
            loss, logs = discriminator_loss(d(real), d(fake))
            return loss, {"loss_D": loss.detach(), **logs}
        if ctx.phase == "G":
            loss = generator_loss(ctx.net("D")(ctx.net("G")(z)))
            return loss, {"loss_G": loss.detach()}
        raise ValueError(f"{self.name} has phases 'D' and 'G', got {ctx.phase!r}")

    @torch.no_grad()
    def sample(self, sampler: nn.Module, n: int, *, seed: int = 0, cond: torch.Tensor | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        if cond is not None or mask is not None:
            raise ValueError(f"{self.name} is unconditional: sample() takes no cond or mask")
        # Noise from a local CPU generator: the same images for a seed on any device,
        # whatever the global RNG state is.
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        z = torch.randn(n, *self.latent_shape, generator=gen)
        # Eval mode: BatchNorm running statistics, so each image depends on its own noise only.
        return run_in_eval(sampler, z)
