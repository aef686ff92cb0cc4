"""The `sat2ground` family: satellite tile -> ground view, trained in two stages (two specs).

Stage 1 (`model.stage: 1`) is a DCGAN on ground views whose generator takes a spatial latent
(N, nz, 4, 4), projects it by one dense layer to the widest 4x4 block (as DCGAN's first layer does
its noise vector: without it the net was translation-equivariant and collapsed to grey) and grows
it with 5 stride-2 4x4 transposed convs to 128x128 (BatchNorm + ReLU, Tanh out); the
discriminator mirrors it (DCGAN's, 5 stride-2 convs to 4x4, then one logit); StepLR decays the
generator's learning rate. It is unconditional: the registered model takes seeds.

Stage 2 (`model.stage: 2`) names the stage-1 model in `model.generator_from` (a snapshot path,
`models:/NAME@ALIAS` or `runs:/...`, resolved to a local file by the driver). An encoder that
mirrors the discriminator maps the satellite tile (`cond`) to that latent; the frozen stage-1
generator turns it into the ground view, compared with the true one (`image`) by MSE, SSIM or a
combined loss (MSE + (1 - SSIM) + a perceptual distance). Only the encoder is trained. The one
network, "E", holds the encoder and the frozen generator, whose weights are buffers (not
parameters: no engine or optimiser can train them), so its snapshot is self-contained: the
registered model maps satellite tiles to ground views without the stage-1 file. DDP leaves those
buffers alone (it would re-send every buffer from rank 0 at each forward): every rank loads them
from the same file, and each rank checks its own load.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Literal, Mapping

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from models.families.dcgan import DCGAN, DCGANConfig
from models.nets.dcgan import (DCGANDiscriminator, dcgan_init_, doubling_widths, down_stack, num_stages,
                               up_block)
from models.snapshot import load_reference
from models.family import Phase, StepContext, run_in_eval
from models.metrics.perceptual import PerceptualDistance
from models.metrics.ssim import ssim

ARCH_KEYS = ("nz", "ngf", "max_channels")   # what the stage-2 spec must share with stage 1


class Sat2GroundConfig(DCGANConfig):
    stage: Literal[1, 2] = 1
    generator_from: str | None = Field(None, description="stage 2: the stage-1 model whose generator is frozen")
    lr_step_every: int | None = Field(10_000, ge=1, description="stage 1: StepLR period of the generator, in steps")
    lr_gamma: float = Field(0.5, gt=0, le=1, description="stage 1: StepLR factor")
    lr_e: float | None = Field(None, gt=0, description="stage 2: encoder learning rate; None -> train.lr")
    loss: Literal["mse", "ssim", "combined"] = Field("combined", description="stage 2 reconstruction loss")
    ssim_weight: float = Field(1.0, ge=0, description="stage 2, combined: weight of 1 - SSIM")
    perceptual_weight: float = Field(1.0, ge=0, description="stage 2, combined: weight of the perceptual distance")

    @model_validator(mode="after")
    def _stage_needs_its_model(self) -> "Sat2GroundConfig":
        if self.stage == 2 and not self.generator_from:
            raise ValueError("stage 2 needs generator_from: the stage-1 model to freeze (path, models:/NAME@ALIAS, runs:/...)")
        if self.stage == 1 and self.generator_from:
            raise ValueError("generator_from is for stage 2; stage 1 trains the generator itself")
        return self


def _as_buffers(module: nn.Module) -> nn.Module:
    """Turns every parameter of `module` into a buffer of the same name: saved and moved with the
    module, invisible to optimisers, DDP and DeepSpeed, untouched by `requires_grad_`."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                del m._parameters[name]
                m.register_buffer(name, p.detach())
    return module


class SpatialLatentGenerator(nn.Module):
    """(N, nz, 4, 4) -> image: DCGAN's generator with its first layer widened to the spatial latent.

    The flattened latent is projected by one dense layer to the widest (C, 4, 4) block (BatchNorm +
    ReLU), then stride-2 4x4 transposed convs (BatchNorm + ReLU) double the size and halve the
    width down to `ngf`, and a last one gives the image (Tanh). The dense projection is what DCGAN's
    stride-1 4x4 transposed conv on a 1x1 noise vector is: every one of the 16 positions gets its
    own weights and sees the whole latent. Without it (the stride-2 convs straight on the latent) the
    network is translation-equivariant on a stationary input: it cannot put sky above ground, nor
    make one coherent scene, and the GAN collapsed to flat grey (benchmarks/BENCHMARKS.md, "Learning").
    """

    latent_size = 4

    def __init__(self, *, resolution: int, channels: int, nz: int = 100, ngf: int = 64, max_channels: int = 512):
        super().__init__()
        s = self.latent_size
        self.nz = nz
        widths = doubling_widths(ngf, num_stages(resolution), max_channels)[::-1]   # widest at 4x4
        self.width = widths[0]
        self.project = nn.Linear(nz * s * s, widths[0] * s * s, bias=False)
        layers: list[nn.Module] = [nn.BatchNorm2d(widths[0]), nn.ReLU(True)]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += up_block(c_in, c_out)
        layers += [nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)
        dcgan_init_(self)
        nn.init.normal_(self.project.weight, 0.0, 0.02)

    def forward(self, z: Tensor) -> Tensor:
        s = self.latent_size
        if z.shape[1:] != (self.nz, s, s):
            raise ValueError(f"expected a latent of shape (N, {self.nz}, {s}, {s}), got {tuple(z.shape)}")
        return self.main(self.project(z.flatten(1)).view(z.shape[0], self.width, s, s))


class Encoder(nn.Module):
    """Satellite tile -> (N, nz, 4, 4): DCGAN's discriminator body down to 4x4, a 3x3 conv to nz."""

    def __init__(self, *, resolution: int, channels: int, nz: int, ndf: int, max_channels: int):
        super().__init__()
        widths = doubling_widths(ndf, num_stages(resolution), max_channels)
        self.main = nn.Sequential(*down_stack(channels, widths), nn.Conv2d(widths[-1], nz, 3, 1, 1))
        dcgan_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


class SatelliteToGround(nn.Module):
    """Stage 2's network: the trained encoder, then the frozen stage-1 generator (always in eval mode)."""

    def __init__(self, encoder: Encoder, generator: SpatialLatentGenerator):
        super().__init__()
        self.encoder = encoder
        self.generator = _as_buffers(generator).eval()
        # Set once the stage-1 weights are in; a snapshot of a trained network carries it.
        self.register_buffer("generator_loaded", torch.tensor(False))
        # DDP (broadcast_buffers, its default) re-sends every buffer of the module it wraps from
        # rank 0 at each forward: the whole frozen generator, every step, for nothing (it never
        # changes, and every rank loads it from the same file). `generator_loaded` stays out too:
        # a broadcast True would hide a rank that could not read the file.
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, self.frozen_buffer_names())

    def frozen_buffer_names(self) -> list[str]:
        """The buffers DDP must not synchronise: the frozen generator's and its loaded flag."""
        return [f"generator.{name}" for name, _ in self.generator.named_buffers()] + ["generator_loaded"]

    def load_generator(self, state: Mapping[str, Tensor]) -> None:
        self.generator.load_state_dict(state)
        self.generator_loaded.fill_(True)

    def train(self, mode: bool = True) -> "SatelliteToGround":
        super().train(mode)
        self.generator.eval()   # frozen: BatchNorm keeps stage 1's running statistics
        return self

    def forward(self, satellite: Tensor) -> Tensor:
        return self.generator(self.encoder(satellite))


class Sat2Ground(DCGAN):
    """Stage 1 is DCGAN's objective on a 4x4 latent (inherited, `SpatialLatentGenerator`); stage 2 is written out below."""

    name = "sat2ground"
    config_cls = Sat2GroundConfig
    # BatchNorm in the generator and the encoder (eval-mode sampling reads their running
    # statistics); stage 2's frozen generator, held as buffers, is a constant: rank 0's everywhere.
    broadcast_buffers = True

    config: Sat2GroundConfig

    def __init__(self, config: Sat2GroundConfig, *, resolution: int, channels: int, lr: float):
        super().__init__(config, resolution=resolution, channels=channels, lr=lr)
        self._generator_checked = False
        self._perceptual = PerceptualDistance() if config.stage == 2 and config.loss == "combined" else None

    # The stage decides the contract's attributes: read-only, from the config.
    @property
    def conditional(self) -> bool:
        return self.config.stage == 2

    @property
    def data_keys(self) -> tuple[str, ...]:
        return ("cond", "image") if self.config.stage == 2 else ("image",)

    @property
    def metrics(self) -> tuple[str, ...]:
        return ("mse", "ssim", "lpips", "fid") if self.config.stage == 2 else ("fid",)

    @property
    def sampler_role(self) -> str:
        return "E" if self.config.stage == 2 else "G"

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.config.nz, 4, 4)

    def _generator(self) -> SpatialLatentGenerator:
        c = self.config
        return SpatialLatentGenerator(resolution=self.resolution, channels=self.channels, nz=c.nz, ngf=c.ngf,
                                      max_channels=c.max_channels)

    def build(self) -> dict[str, nn.Module]:
        c = self.config
        if c.stage == 1:
            return {"G": self._generator(),
                    "D": DCGANDiscriminator(resolution=self.resolution, channels=self.channels, ndf=c.ndf,
                                       max_channels=c.max_channels)}
        net = SatelliteToGround(Encoder(resolution=self.resolution, channels=self.channels, nz=c.nz, ndf=c.ndf,
                                        max_channels=c.max_channels), self._generator())
        # Absent when a stage-2 snapshot is loaded elsewhere: its state holds the generator anyway.
        if os.path.isfile(c.generator_from):
            net.load_generator(self._stage1_generator(c.generator_from).state_dict())
        return {"E": net}

    def _stage1_generator(self, path: str) -> nn.Module:

        return load_reference(path, family=self, field="generator_from", wanted="a sat2ground stage-1 model",
                              fits=lambda f: f.config.stage == 1, keys=ARCH_KEYS, label="stage-1 generator")

    def phases(self) -> list[Phase]:
        c = self.config
        if c.stage == 1:
            # DCGAN's phases in DCGAN's order (its loss may rely on it), StepLR on the generator.
            return [dataclasses.replace(ph, lr_step_every=c.lr_step_every, lr_gamma=c.lr_gamma) if ph.name == "G"
                    else ph for ph in super().phases()]
        return [Phase("E", c.lr_e if c.lr_e is not None else self.lr, (c.beta1, c.beta2))]

    def loss(self, batch: Mapping[str, Tensor], ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        if self.config.stage == 1:
            return super().loss(batch, ctx)
        if ctx.phase != "E":
            raise ValueError(f"sat2ground stage 2 has the phase 'E', got {ctx.phase!r}")
        # Checked once: reading the device buffer every step would sync the GPU each step.
        if not self._generator_checked:
            if not bool(ctx.networks["E"].generator_loaded):
                raise RuntimeError(f"model.generator_from: {self.config.generator_from} could not be read on this "
                                   "worker; stage 2 would train against an untrained generator")
            self._generator_checked = True
        fake, real = ctx.net("E")(batch["cond"]), batch["image"]
        return self.reconstruction_loss(fake, real)

    def reconstruction_loss(self, fake: Tensor, real: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        c = self.config
        terms: dict[str, Tensor] = {}
        if c.loss in ("mse", "combined"):
            terms["mse"] = F.mse_loss(fake, real)
        if c.loss in ("ssim", "combined"):
            # On [0, 1] with data_range 1, as the metric: SSIM's luminance term is not shift-invariant,
            # so [-1, 1] with data_range 2 would score a 1% brightness shift near mid-grey as 0.52.
            terms["ssim"] = 1 - ssim((fake + 1) / 2, (real + 1) / 2, data_range=1.0).mean()
        if c.loss == "combined":
            terms["perceptual"] = self._perceptual.to(fake.device)(fake, real).mean()
            loss = terms["mse"] + c.ssim_weight * terms["ssim"] + c.perceptual_weight * terms["perceptual"]
        else:
            loss = terms[c.loss]
        return loss, {"loss_E": loss.detach(), **{f"E_{k}": v.detach() for k, v in terms.items()}}

    @torch.no_grad()
    def sample(self, sampler: nn.Module, n: int, *, seed: int = 0, cond: Tensor | None = None,
               mask: Tensor | None = None) -> Tensor:
        if self.config.stage == 1:
            return super().sample(sampler, n, seed=seed, cond=cond, mask=mask)
        if cond is None or mask is not None:
            raise ValueError("sat2ground stage 2 takes `cond` (satellite tiles) and no mask")
        if cond.shape[0] != n:
            raise ValueError(f"sat2ground: n={n} but {cond.shape[0]} satellite tiles")
        return run_in_eval(sampler, cond)

    @torch.no_grad()
    def sample_seeds(self, sampler: nn.Module, seeds: list[int], *, cond: Tensor | None = None,
                     mask: Tensor | None = None) -> Tensor:
        """`Family.sample_seeds` in one forward. Stage 1: DCGAN's per-seed latents (4x4). Stage 2:
        `sample` uses no seed (eval mode), so image i is the ground view of tile i alone."""
        if self.config.stage == 1:
            return super().sample_seeds(sampler, seeds, cond=cond, mask=mask)
        return self.sample(sampler, len(seeds), cond=cond, mask=mask)
