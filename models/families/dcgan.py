"""The `dcgan` family: DCGAN (Radford et al. 2016) for remote-sensing scenes (RSI-CB, 128²).

The networks are in `models.nets.dcgan`; this file holds the published defaults and one step of
the two-player game.
"""
from __future__ import annotations

from typing import Mapping

import torch
from pydantic import Field
from torch import nn

from models.family import Family, Phase, StepContext, run_in_eval
from models.losses.adversarial import TwoPlayerConfig, discriminator_loss, generator_loss, two_player_phases
from models.nets.dcgan import DCGANDiscriminator, DCGANGenerator, num_stages


class DCGANConfig(TwoPlayerConfig):
    """The `model:` section of a dcgan spec; defaults are the paper's."""

    nz: int = Field(100, gt=0, description="length of the noise vector")
    ngf: int = Field(64, gt=0, description="generator width at the last up-block")
    ndf: int = Field(64, gt=0, description="discriminator width at the first down-block")
    max_channels: int = Field(512, gt=0, description="cap on the width of any block (large resolutions)")



class DCGAN(Family):
    name = "dcgan"
    config_cls = DCGANConfig
    conditional = False
    metrics = ("fid",)
    sampler_role = "G"
    tiny = {"data.resolution": 16, "model.nz": 8, "model.ngf": 8, "model.ndf": 8}

    config: DCGANConfig

    def __init__(self, config: DCGANConfig, *, resolution: int, channels: int, lr: float):
        super().__init__(config, resolution=resolution, channels=channels, lr=lr)
        num_stages(resolution)   # fail at spec validation time, not at the first build
        if channels < 1:
            raise ValueError(f"data.channels must be >= 1, got {channels}")

    def build(self) -> dict[str, nn.Module]:
        c = self.config
        return {
            "G": DCGANGenerator(resolution=self.resolution, channels=self.channels, nz=c.nz, ngf=c.ngf,
                           max_channels=c.max_channels),
            "D": DCGANDiscriminator(resolution=self.resolution, channels=self.channels, ndf=c.ndf,
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
