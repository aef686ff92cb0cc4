"""The `dcgan` family: DCGAN (Radford et al. 2016) for remote-sensing scenes (RSI-CB, 128²).

The networks are in `models.nets.dcgan`; this file holds the published defaults and one step of
the two-player game.

One generator forward per step, as in the references (PyTorch's dcgan example makes `fake` once,
feeds it detached to D's loss and with its graph to G's): phase "G" runs first, makes the fake with
its graph, takes G's loss through the frozen D, and keeps the detached fake of each micro-batch
(`StepFakes`) for phase "D" of the same step, which learns from exactly those images. The
references update D first, so their G loss sees the D of after this step's update; here it sees
the D of before it. The order is forced: the train loop makes only the phase's own network
trainable, so a graph through G cannot be built while D trains. In both, D learns from the fake
that G made before its own update.

R1 (Mescheder et al. 2018; off by default, as in the paper): `r1_gamma` / 2 · E‖∇ₓD(x)‖² on the
reals, taken every `r1_every` D steps and scaled by `r1_every` (StyleGAN2's lazy rule). The
quickstart uses it: with it, its samples' bowls show their lit rims within its CPU budget, and FID
is lower (benchmarks/BENCHMARKS.md, "Quickstart samples").
"""
from __future__ import annotations

from typing import Mapping

import torch
from pydantic import Field
from torch import nn

from models.family import Family, Phase, StepContext, run_in_eval
from models.losses.adversarial import TwoPlayerConfig, discriminator_loss, generator_loss, two_player_phases
from models.losses.step_fakes import StepFakes
from models.losses.stylegan2 import r1_penalty
from models.nets.dcgan import DCGANDiscriminator, DCGANGenerator, num_stages


class DCGANConfig(TwoPlayerConfig):
    """The `model:` section of a dcgan spec; defaults are the paper's."""

    nz: int = Field(100, gt=0, description="length of the noise vector")
    ngf: int = Field(64, gt=0, description="generator width at the last up-block")
    ndf: int = Field(64, gt=0, description="discriminator width at the first down-block")
    max_channels: int = Field(512, gt=0, description="cap on the width of any block (large resolutions)")
    r1_gamma: float = Field(0.0, ge=0, description="R1 penalty weight on the reals; 0 (the paper's): none")
    r1_every: int = Field(1, ge=1, description="take R1 every this many steps, scaled by it (lazy R1)")


class DCGAN(Family):
    name = "dcgan"
    config_cls = DCGANConfig
    conditional = False
    metrics = ("fid",)
    sampler_role = "G"
    tiny = {"data.resolution": 16, "model.nz": 8, "model.ngf": 8, "model.ndf": 8}
    # G and D hold BatchNorm running statistics, which eval-mode forwards read (sampling, a preview
    # on any rank): each rank keeps rank 0's, as torch does by default.
    broadcast_buffers = True

    config: DCGANConfig

    def __init__(self, config: DCGANConfig, *, resolution: int, channels: int, lr: float):
        super().__init__(config, resolution=resolution, channels=channels, lr=lr)
        num_stages(resolution)   # fail at spec validation time, not at the first build
        if channels < 1:
            raise ValueError(f"data.channels must be >= 1, got {channels}")
        self._fakes = StepFakes(self.name)

    def build(self) -> dict[str, nn.Module]:
        c = self.config
        return {
            "G": DCGANGenerator(resolution=self.resolution, channels=self.channels, nz=c.nz, ngf=c.ngf,
                           max_channels=c.max_channels),
            "D": DCGANDiscriminator(resolution=self.resolution, channels=self.channels, ndf=c.ndf,
                               max_channels=c.max_channels),
        }

    def needs_double_backward(self) -> bool:
        return self.config.r1_gamma > 0

    def phases(self) -> list[Phase]:
        # G first: its phase makes the step's one fake, which D's phase then learns from.
        return two_player_phases(self.config, self.lr, order=("G", "D"))

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """Shape of one noise sample."""
        return (self.config.nz, 1, 1)

    def _noise(self, n: int, ctx: StepContext) -> torch.Tensor:
        # ctx.generator, when given, must live on ctx.device (torch.randn's rule).
        return torch.randn(n, *self.latent_shape, device=ctx.device, generator=ctx.generator)

    def loss(self, batch: Mapping[str, torch.Tensor], ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        real = batch["image"]
        if ctx.phase == "G":
            fake = ctx.net("G")(self._noise(real.shape[0], ctx))
            self._fakes.put(ctx, fake.detach())
            loss = generator_loss(ctx.net("D")(fake))
            return loss, {"loss_G": loss.detach()}
        if ctx.phase == "D":
            fake = self._fakes.take(ctx, real.shape[0])
            d = ctx.net("D")
            # Separate forward calls: BatchNorm normalises real and fake batches apart, as in DCGAN.
            loss, logs = discriminator_loss(d(real), d(fake))
            logs = {"loss_D": loss.detach(), **logs}
            c = self.config
            if c.r1_gamma > 0 and ctx.step % c.r1_every == 0:
                # Its own forward through the bare module: DeepSpeed treats any backward pass over its
                # engine's graph, autograd.grad's included, as the training backward.
                r1_in = real.detach().requires_grad_(True)
                r1 = r1_penalty(ctx.networks["D"](r1_in), r1_in).mean()
                loss = loss + c.r1_gamma / 2 * r1 * c.r1_every
                logs["r1"] = r1.detach()
            return loss, logs
        raise ValueError(f"{self.name} has phases 'G' and 'D', got {ctx.phase!r}")

    @torch.no_grad()
    def sample(self, sampler: nn.Module, n: int, *, seed: int = 0, cond: torch.Tensor | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        if cond is not None or mask is not None:
            raise ValueError(f"{self.name} is unconditional: sample() takes no cond or mask")
        # Noise from a local CPU generator: the same images for a seed on any device,
        # whatever the global RNG state is.
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        z = torch.randn(n, *self.latent_shape, generator=gen)
        # Eval mode: BatchNorm running statistics, so each image depends on its own noise only. The
        # references sample in train mode (batch statistics): an image would then change with its
        # batch-mates, and one image alone (n=1) could not be drawn. Measured on the quickstart
        # (benchmarks/BENCHMARKS.md, "Learning"): eval mode, train mode and statistics recomputed
        # over 1024 fresh noise vectors give the same grids.
        return run_in_eval(sampler, z)

    @torch.no_grad()
    def sample_seeds(self, sampler: nn.Module, seeds: list[int], *, cond: torch.Tensor | None = None,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
        """`Family.sample_seeds` in one forward: image i's noise is what `sample(sampler, 1, seed=seeds[i])`
        draws, and eval mode keeps it independent of its batch-mates."""
        if cond is not None or mask is not None:
            raise ValueError(f"{self.name} is unconditional: sample_seeds() takes no cond or mask")
        if not seeds:
            raise ValueError(f"{self.name}: sample_seeds() needs at least one seed")
        z = torch.cat([torch.randn(1, *self.latent_shape, generator=torch.Generator(device="cpu").manual_seed(int(s)))
                       for s in seeds])
        return run_in_eval(sampler, z)
