"""The `diffusion` family: DDPM training (Ho et al. 2020), DDIM sampling (Song et al. 2021).

One trained network, "eps", predicts the noise ε added to an image at a uniformly drawn step t
of the forward process (MSE(ε̂, ε)); "ema" is its exponential moving average, updated after
every step with DDPM's decay (0.9999) warmed up as min(decay, (1 + n) / (10 + n)), and it is
what samples and what is registered. `model.conditioning` picks what the UNet sees:

  none        x_t only; unconditional (the batch carries `image`; the registered model takes seeds)
  concat      x_t ⊕ past image ⊕ change mask as input channels (the batch carries `cond`, `mask`,
              `image`: past -> future, as the spatio-temporal cGANs)
  controlnet  a frozen unconditional diffusion model of the same images (`model.base_from`: a
              snapshot path, `models:/NAME@ALIAS` or `runs:/...`, resolved to a local file by the
              driver) steered by a ControlNet that sees past image ⊕ mask (models/nets/controlnet.py);
              only the ControlNet trains. The network holds the base too, so its snapshot is
              self-contained: the registered model needs no base file.

The noise schedules come from diffusers (DDPMScheduler for the forward process, DDIMScheduler
for sampling in `sample_steps` steps, ε-prediction, x̂_0 clipped to [-1, 1]); the UNet is ours
(models/nets/ddpm_unet.py).
"""
from __future__ import annotations

import copy
import os
from functools import cached_property
from typing import Literal, Mapping

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from models.nets.controlnet import ControlledUNet, ControlNet
from models.nets.ddpm_unet import DDPMUNet, check_layout
from models.snapshot import load_reference
from models.family import Family, FamilyConfig, Phase, StepContext, StepEnd, update_ema

SCHEDULES = {"cosine": "squaredcos_cap_v2", "linear": "linear"}   # ours -> diffusers' beta_schedule
# What a ControlNet spec must share with its base: the network's layout and the noise process it learned.
BASE_KEYS = ("base_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "timesteps", "schedule")
MASK_CHANNELS = 1
UNCONDITIONAL_METRICS = ("fid", "kid")
# The spatio-temporal cGANs' metrics: the same task, judged the same way.
CONDITIONAL_METRICS = ("lpips", "ssim", "psnr", "fid", "f1")


class DiffusionConfig(FamilyConfig):
    """The `model:` section of a diffusion spec; defaults are DDPM's (CIFAR-10 network at width 64)."""

    conditioning: Literal["none", "concat", "controlnet"] = Field(
        "none", description="none: unconditional; concat: past image and change mask as extra input channels; "
                            "controlnet: a ControlNet steers the frozen unconditional model named in base_from")
    base_channels: int = Field(64, gt=0, description="UNet width at full resolution (DDPM: 128)")
    channel_mult: list[int] = Field([1, 2, 2, 2], min_length=1,
                                    description="width of each level as a multiple of base_channels; each level "
                                                "after the first halves the feature map")
    num_res_blocks: int = Field(2, ge=1, description="residual blocks per level in the encoder (decoder: one more)")
    attention_resolutions: list[int] = Field([16], description="feature-map sizes (in pixels) that get self-attention")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout in every residual block")
    timesteps: int = Field(1000, ge=2, description="steps T of the forward (noising) process")
    schedule: Literal["cosine", "linear"] = Field("cosine", description="β schedule: cosine (Nichol & Dhariwal) "
                                                                       "or linear 1e-4..0.02 (DDPM; scaled by 1000/T)")
    sample_steps: int = Field(50, ge=1, description="DDIM steps when sampling")
    ddim_eta: float = Field(0.0, ge=0, le=1, description="DDIM noise: 0 deterministic given the seed's start noise, 1 DDPM-like")
    ema_decay: float = Field(0.9999, ge=0, lt=1, description="EMA decay per step, warmed up as (1 + n) / (10 + n)")
    beta1: float = Field(0.9, ge=0, lt=1, description="Adam β1")
    beta2: float = Field(0.999, ge=0, lt=1, description="Adam β2")
    base_from: str | None = Field(None, description="controlnet: the frozen unconditional diffusion model "
                                                    "(snapshot path, models:/NAME@ALIAS, runs:/...)")

    @model_validator(mode="after")
    def _consistent(self) -> "DiffusionConfig":
        if any(m < 1 for m in self.channel_mult):
            raise ValueError(f"channel_mult entries must be >= 1, got {self.channel_mult}")
        if self.sample_steps > self.timesteps:
            raise ValueError(f"sample_steps ({self.sample_steps}) cannot exceed timesteps ({self.timesteps})")
        if self.conditioning == "controlnet" and not self.base_from:
            raise ValueError("conditioning controlnet needs base_from: the unconditional diffusion model to steer "
                             "(path, models:/NAME@ALIAS, runs:/...)")
        if self.conditioning != "controlnet" and self.base_from:
            raise ValueError(f"base_from is for conditioning controlnet; conditioning {self.conditioning} trains "
                             "its whole network")
        return self


class Diffusion(Family):
    name = "diffusion"
    config_cls = DiffusionConfig
    sampler_role = "ema"
    tiny = {"data.resolution": 16, "model.base_channels": 8, "model.channel_mult": [1, 2], "model.num_res_blocks": 1,
            "model.attention_resolutions": [8], "model.sample_steps": 2}
    # "eps" (the only DDP-wrapped network) has GroupNorm, which keeps no running statistics; its only
    # buffer is the ControlNet's `base_loaded` flag, a constant set at build (the EMA copy has no
    # engine). Nothing to copy before each forward.
    broadcast_buffers = False

    config: DiffusionConfig

    def __init__(self, config: DiffusionConfig, *, resolution: int, channels: int, lr: float):
        super().__init__(config, resolution=resolution, channels=channels, lr=lr)
        if channels < 1:
            raise ValueError(f"data.channels must be >= 1, got {channels}")
        check_layout(resolution, config.channel_mult, config.attention_resolutions)   # at spec validation
        self._base_checked = False

    # `model.conditioning` decides what the contract's attributes are: read-only, from the config.
    @property
    def conditional(self) -> bool:
        return self.config.conditioning != "none"

    @property
    def data_keys(self) -> tuple[str, ...]:
        return ("cond", "mask", "image") if self.conditional else ("image",)

    @property
    def metrics(self) -> tuple[str, ...]:
        return CONDITIONAL_METRICS if self.conditional else UNCONDITIONAL_METRICS

    # diffusers is imported on first use: every process that lists the families imports this module.
    def _schedule(self) -> dict:
        """The scheduler settings that training and sampling share."""
        c = self.config
        # DDPM's linear β range is for T = 1000; scaled by 1000/T (as improved DDPM does) so that a
        # shorter process still ends in pure noise.
        scale = 1000 / c.timesteps
        return {"num_train_timesteps": c.timesteps, "beta_schedule": SCHEDULES[c.schedule],
                "beta_start": min(1e-4 * scale, 0.5), "beta_end": min(0.02 * scale, 0.999),
                "prediction_type": "epsilon", "clip_sample": True}

    @cached_property
    def noise_scheduler(self):
        from diffusers import DDPMScheduler

        return DDPMScheduler(**self._schedule())

    def sampling_scheduler(self):
        """A fresh DDIM scheduler (set_timesteps mutates it) set to `sample_steps`."""
        from diffusers import DDIMScheduler

        # "trailing" spacing (Lin et al. 2024, Table 2): the first step is t = T-1, pure noise, as the
        # model was trained; diffusers' default "leading" would start at T - T/steps (t = 980 of 1000).
        sched = DDIMScheduler(**self._schedule(), set_alpha_to_one=True, timestep_spacing="trailing")
        sched.set_timesteps(self.config.sample_steps)
        return sched

    def _unet(self, in_channels: int) -> DDPMUNet:
        c = self.config
        return DDPMUNet(in_channels=in_channels, out_channels=self.channels, resolution=self.resolution,
                    base_channels=c.base_channels, channel_mult=c.channel_mult, num_res_blocks=c.num_res_blocks,
                    attention_resolutions=c.attention_resolutions, dropout=c.dropout)

    def build(self) -> dict[str, nn.Module]:
        c = self.config
        if c.conditioning == "controlnet":
            base = self._unet(self.channels)
            eps: nn.Module = ControlledUNet(base, ControlNet(base, self.channels + MASK_CHANNELS))
            # Absent when a controlnet snapshot is loaded elsewhere: its state holds the base anyway.
            if os.path.isfile(c.base_from):
                eps.load_base(self._base_state(c.base_from))
        else:
            extra = self.channels + MASK_CHANNELS if c.conditioning == "concat" else 0
            eps = self._unet(self.channels + extra)
        return {"eps": eps, "ema": copy.deepcopy(eps).requires_grad_(False).eval()}

    def _base_state(self, path: str) -> dict[str, Tensor]:

        return load_reference(path, family=self, field="base_from", wanted="an unconditional diffusion model",
                              fits=lambda f: f.config.conditioning == "none", keys=BASE_KEYS, label="base").state_dict()

    def phases(self) -> list[Phase]:
        return [Phase("eps", self.lr, (self.config.beta1, self.config.beta2))]

    def condition(self, cond: Tensor | None, mask: Tensor | None, n: int | None = None) -> Tensor | None:
        """What the network sees besides x_t: past image ⊕ change mask, or None (unconditional)."""
        if not self.conditional:
            if cond is not None or mask is not None:
                raise ValueError(f"{self.name} with conditioning none is unconditional: it takes no cond or mask")
            return None
        if cond is None or mask is None:
            raise ValueError(f"{self.name} ({self.config.conditioning}) needs `cond` (the past image) and `mask` "
                             "(the change mask)")
        if cond.shape[1] != self.channels or mask.shape[1] != MASK_CHANNELS:
            raise ValueError(f"{self.name}: cond must have {self.channels} channels and the change mask "
                             f"{MASK_CHANNELS}, got {cond.shape[1]} and {mask.shape[1]}")
        if n is not None and cond.shape[0] != n:
            raise ValueError(f"{self.name}: n={n} but {cond.shape[0]} input images")
        return torch.cat([cond, mask], dim=1)

    def predict(self, net: nn.Module, x: Tensor, t: Tensor, hint: Tensor | None) -> Tensor:
        """ε̂ for x_t at steps t (N,), given the condition `hint` where the family has one."""
        if self.config.conditioning == "concat":
            return net(torch.cat([x, hint.to(x.dtype)], dim=1), t)
        if self.config.conditioning == "controlnet":
            return net(x, t, hint.to(x.dtype))
        return net(x, t)

    def loss(self, batch: Mapping[str, Tensor], ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        if ctx.phase != "eps":
            raise ValueError(f"{self.name} has the phase 'eps', got {ctx.phase!r}")
        # Checked once: reading the device buffer every step would sync the GPU each step.
        if self.config.conditioning == "controlnet" and not self._base_checked:
            if not bool(ctx.networks["eps"].base_loaded):
                raise RuntimeError(f"model.base_from: {self.config.base_from} could not be read on this worker; "
                                   "the ControlNet would train against an untrained base")
            self._base_checked = True
        x0 = batch["image"]
        hint = self.condition(batch.get("cond"), batch.get("mask"))
        # ctx.generator, when given, must live on ctx.device (torch's rule); else the global RNG,
        # which the loop reseeds every step.
        t = torch.randint(0, self.config.timesteps, (x0.shape[0],), device=ctx.device, generator=ctx.generator)
        noise = torch.randn(x0.shape, device=ctx.device, generator=ctx.generator)
        xt = self.noise_scheduler.add_noise(x0, noise, t)
        loss = F.mse_loss(self.predict(ctx.net("eps"), xt, t, hint).float(), noise)
        return loss, {"loss_eps": loss.detach()}

    def after_step(self, end: StepEnd) -> dict[str, float]:
        decay = min(self.config.ema_decay, (1 + end.step) / (10 + end.step))
        src, dst = end.networks["eps"], end.networks["ema"]
        if isinstance(src, ControlledUNet):   # the base is the same frozen weights in both
            src, dst = src.control, dst.control
        update_ema(dst, src, decay)
        return {"ema_decay": decay}

    @torch.no_grad()
    def sample(self, sampler: nn.Module, n: int, *, seed: int = 0, cond: Tensor | None = None,
               mask: Tensor | None = None) -> Tensor:
        # Start noise (and DDIM's noise when eta > 0) from a local CPU generator: the same images
        # for a seed on any device, whatever the global RNG state is.
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        x = torch.randn(n, self.channels, self.resolution, self.resolution, generator=gen)
        return self._denoise(sampler, x, self.condition(cond, mask, n), gen)

    @torch.no_grad()
    def sample_seeds(self, sampler: nn.Module, seeds: list[int], *, cond: Tensor | None = None,
                     mask: Tensor | None = None) -> Tensor:
        """`Family.sample_seeds` with one network call per DDIM step for the whole batch: image i
        starts from the x_T that `sample(sampler, 1, seed=seeds[i], ...)` draws, and with eta > 0
        takes each step's noise from its own seed's generator, in `sample`'s order (x_T, then one
        draw per step)."""
        if not seeds:
            raise ValueError(f"{self.name}: sample_seeds() needs at least one seed")
        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
        x = torch.cat([torch.randn(1, self.channels, self.resolution, self.resolution, generator=g) for g in gens])
        # A list of generators: diffusers draws row i of the step noise (eta > 0) from generator i,
        # with the shape, dtype and device `sample` draws one image's with.
        return self._denoise(sampler, x, self.condition(cond, mask, len(seeds)), gens)

    def _denoise(self, sampler: nn.Module, x: Tensor, hint: Tensor | None, generator) -> Tensor:
        """DDIM from x_T (on the CPU) to the images, on the sampler's device; `generator` draws the
        step noise when eta > 0 (one, or one per row)."""
        param = next(sampler.parameters())
        x = x.to(param.device, param.dtype)
        if hint is not None:
            hint = hint.to(param.device, param.dtype)
        sched = self.sampling_scheduler()
        was_training = sampler.training
        sampler.eval()   # no dropout: the output depends on the seed (and the input) only
        try:
            for t in sched.timesteps:
                eps = self.predict(sampler, x, t.to(param.device).expand(x.shape[0]), hint)
                x = sched.step(eps, int(t), x, eta=self.config.ddim_eta, generator=generator).prev_sample
        finally:
            sampler.train(was_training)
        # The last DDIM step returns the clipped x̂_0; the clamp only guards float rounding.
        return x.float().clamp(-1, 1)
