"""The `pix2pix` family: image-to-image translation with a conditional GAN (Isola et al. 2017).

A UNet generator maps the input image to the output; a PatchGAN discriminator judges (input,
output) pairs, patch by patch. Objective: adversarial + λ·L1(output, target), λ = 100; the
discriminator's loss is halved (the paper: "we divide the objective by 2 while optimizing D").
Adam 2e-4, β1 0.5. The batch carries `cond` (the input, e.g. a satellite tile) and `image` (the
target, e.g. the map). The spatio-temporal cGANs (`models.families.cgan`) are this family with another input.

One generator forward per step, as in the reference (which makes `fake_B` once and feeds it,
detached, to D and, with its graph, to G's loss): phase "G" runs first, computes the fake with its
graph, G's loss through the frozen D, and keeps the detached fake of each micro-batch for phase "D"
of the same step (`StepFakes`). The reference updates D first, so its G loss sees the D of after
this step's update; here G's loss sees D before it (the train loop cannot build a graph through G
in a phase that trains D). In both, the fake D learns from is the one G made before its own update,
and the dropout noise of the UNet is one sample serving both players.

Sampling runs the generator in eval mode (dropout off, BatchNorm running statistics), so the
output is a deterministic function of the input; `seed` is accepted and unused.
"""
from __future__ import annotations

from typing import ClassVar, Mapping

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from models.losses.step_fakes import StepFakes
from models.losses.adversarial import TwoPlayerConfig, discriminator_loss, generator_loss, two_player_phases
from models.family import Family, Phase, StepContext, run_in_eval
from models.nets.patchgan import PatchGAN, patch_grid
from models.nets.pix2pix_unet import Pix2PixUNet


class Pix2PixConfig(TwoPlayerConfig):
    """The `model:` section of pix2pix and the spatio-temporal cGANs; defaults are pix2pix's."""

    ngf: int = Field(64, gt=0, description="UNet width at the outermost level")
    ndf: int = Field(64, gt=0, description="PatchGAN width at the first conv")
    depth: int | None = Field(None, ge=2, description="UNet downsamplings; None -> log2(resolution), a 1x1 "
                                                       "bottleneck (UNet-256 at 256x256)")
    d_layers: int = Field(3, ge=1, description="PatchGAN stride-2 convs; 3 -> 70x70 patches")
    dropout: float = Field(0.5, ge=0, lt=1, description="dropout in the UNet's middle decoder blocks")
    l1_weight: float = Field(100.0, ge=0, description="λ of the L1 term")


class Pix2Pix(Family):
    name = "pix2pix"
    config_cls = Pix2PixConfig
    conditional = True
    data_keys = ("cond", "image")
    metrics = ("l1", "ssim", "psnr", "fid")
    sampler_role = "G"
    tiny = {"data.resolution": 16, "model.ngf": 8, "model.ndf": 8, "model.d_layers": 2}
    attention: ClassVar[bool] = False   # attention gates on the UNet's skips
    mask_channels: ClassVar[int] = 0    # channels of a `mask` input concatenated to `cond`
    # The UNet and PatchGAN hold BatchNorm running statistics (eval-mode sampling reads them): every
    # rank keeps rank 0's, as torch does by default. The cGANs of cgan.py inherit this.
    broadcast_buffers = True

    config: Pix2PixConfig

    def __init__(self, config: Pix2PixConfig, *, resolution: int, channels: int, lr: float):
        super().__init__(config, resolution=resolution, channels=channels, lr=lr)
        if channels < 1:
            raise ValueError(f"data.channels must be >= 1, got {channels}")
        depth = self.depth
        if resolution < 4 or resolution % 2**depth:
            raise ValueError(f"data.resolution ({resolution}) must be divisible by 2**model.depth "
                             f"(2**{depth}) for the {self.name} UNet")
        if patch_grid(resolution, config.d_layers) < 1:
            raise ValueError(f"model.d_layers={config.d_layers} is too deep for data.resolution={resolution}: "
                             f"the PatchGAN needs resolution >= {3 * 2**config.d_layers}")
        self._fakes = StepFakes(self.name)

    @property
    def depth(self) -> int:
        if self.config.depth is not None:
            return self.config.depth
        if self.resolution < 4 or self.resolution & (self.resolution - 1):
            raise ValueError(f"data.resolution must be a power of two when model.depth is not set, got {self.resolution}")
        return self.resolution.bit_length() - 1

    @property
    def in_channels(self) -> int:
        return self.channels + self.mask_channels

    def generator_input(self, cond: Tensor | None, mask: Tensor | None) -> Tensor:
        """What the generator (and, beside the output, the discriminator) sees."""
        if cond is None:
            raise ValueError(f"{self.name} is conditional: it needs `cond` images")
        if mask is not None:
            raise ValueError(f"{self.name} takes no mask")
        return cond

    def build(self) -> dict[str, nn.Module]:
        c = self.config
        return {
            "G": Pix2PixUNet(self.in_channels, self.channels, depth=self.depth, ngf=c.ngf, dropout=c.dropout,
                      attention=self.attention),
            "D": PatchGAN(self.in_channels + self.channels, ndf=c.ndf, n_layers=c.d_layers),
        }

    def phases(self) -> list[Phase]:
        # G first: its phase makes the step's one fake, which D's phase then learns from.
        return two_player_phases(self.config, self.lr, order=("G", "D"))

    def loss(self, batch: Mapping[str, Tensor], ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        x, real = self.generator_input(batch.get("cond"), batch.get("mask")), batch["image"]
        if ctx.phase == "G":
            fake = ctx.net("G")(x)
            self._fakes.put(ctx, fake.detach())
            adv = generator_loss(ctx.net("D")(torch.cat([x, fake], 1)))
            l1 = F.l1_loss(fake, real)
            loss = adv + self.config.l1_weight * l1
            return loss, {"loss_G": loss.detach(), "G_adv": adv.detach(), "G_L1": l1.detach()}
        if ctx.phase == "D":
            fake = self._fakes.take(ctx, len(x))
            d = ctx.net("D")
            # Real and fake pairs in separate calls: BatchNorm normalises them apart, as in pix2pix.
            loss, logs = discriminator_loss(d(torch.cat([x, real], 1)), d(torch.cat([x, fake], 1)))
            loss = 0.5 * loss
            return loss, {"loss_D": loss.detach(), **logs}
        raise ValueError(f"{self.name} has phases 'G' and 'D', got {ctx.phase!r}")

    @torch.no_grad()
    def sample(self, sampler: nn.Module, n: int, *, seed: int = 0, cond: Tensor | None = None,
               mask: Tensor | None = None) -> Tensor:
        x = self.generator_input(cond, mask)
        if x.shape[0] != n:
            raise ValueError(f"{self.name}: n={n} but {x.shape[0]} input images")
        return run_in_eval(sampler, x)

    @torch.no_grad()
    def sample_seeds(self, sampler: nn.Module, seeds: list[int], *, cond: Tensor | None = None,
                     mask: Tensor | None = None) -> Tensor:
        """`Family.sample_seeds` in one forward: `sample` uses no seed (eval mode: no dropout), so
        image i is the output for input row i alone; `seeds` only counts the images."""
        return self.sample(sampler, len(seeds), cond=cond, mask=mask)
