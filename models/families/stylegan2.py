"""The `stylegan2` family: SCB-GAN = StyleGAN2 + ADA + the vision-aided discriminator loss
(+ MineAug, which the train loop applies to the data; see models/augment/mineaug.py).

Networks: "G" (mapping + synthesis), "D" (StyleGAN2's residual discriminator together with the
vision-aided heads, one trained network, so one engine and one optimizer), "G_ema" (the
generator's moving average, what samples and what is registered). The pretrained backbones the
heads read are frozen and are not networks of the run: every rank loads them from the local files
named in `model.vision_aided.weights`, and checkpoints do not copy them.

Losses (MINEAUG.md §2–§4): non-saturating logistic loss; lazy R1 on the (augmented) reals every
`r1_every` D steps, scaled by `r1_every` (the lazy-regularisation rule of StyleGAN2, here added to
that step's D loss rather than taken as a separate optimizer step); path-length regularisation
every `pl_every` G steps, scaled likewise; style mixing. ADA augments every image D sees, in both
phases, with p adapted between steps from sign(D(real)). Vision-aided: after `warmup_kimg` of
plain StyleGAN2-ADA, each stage adds the backbone whose pooled features best separate real from
generated images (linear probe); heads of backbones not yet added receive exactly zero gradient,
so with Adam they do not move, and the network's parameter set stays fixed for DDP and DeepSpeed.
Each backbone's heads are a parameter group of D's optimizer (β = (0, 0.99), D's rate, as the
reference's separate optimizer); the group gets fresh Adam state when its stage starts, so its
first update is ≈ lr as in the reference, not the ≈ 10·lr that Adam's bias correction, spent on
the zero-gradient steps, would give (β2 = 0.99: √(1 − 0.99) = 0.1).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn

from models.augment.ada import AdaptiveAugment
from models.family import (Family, FamilyConfig, Phase, StepContext, StepEnd, run_in_eval,
                           update_ema)
from models.losses.stylegan2 import PathLengthPenalty, r1_penalty, style_mixing_ws
from models.nets.stylegan2 import StyleGAN2Discriminator, StyleGAN2Generator
from models.losses.vision_aided import VisionAidedHeads, choose_backbone, d_loss as heads_d_loss, g_loss as heads_g_loss
from models.nets.vision_backbones import BACKBONES, build_backbone, feature_dims

PROBE_MIN_IMAGES = 4   # of each side: fewer cannot be split into a fit and a held-out part
BackboneKind = Literal["clip_vitb32", "dino_vitb16", "swin_t", "vgg16"]


class AdaSettings(BaseModel):
    """`augment.ada` of the spec (MINEAUG.md §3)."""

    model_config = ConfigDict(extra="forbid")
    target: float = Field(0.6, gt=0, lt=1, description="the sign(D(real)) mean that p steers towards")
    interval: int = Field(4, ge=1, description="adjust p every this many steps")
    speed_kimg: float = Field(500, gt=0, description="kimg for p to go from 0 to 1")
    initial_p: float = Field(0.0, ge=0, le=1)


class VisionAidedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    candidates: list[BackboneKind] = Field(list(BACKBONES), description="backbones the linear probe chooses from")
    weights: dict[BackboneKind, str] = Field({}, description="local weights file of each candidate "
                                                             "(open_clip / timm / torchvision layouts)")
    size: Literal["base", "tiny"] = Field("base", description="tiny: small random-width backbones for tests")
    clip_activation: Literal["quick_gelu", "gelu"] = Field("quick_gelu", description="quick_gelu for OpenAI's CLIP "
                                                                                     "weights, gelu for LAION's")
    warmup_kimg: float = Field(500, ge=0, description="plain StyleGAN2-ADA before the first backbone")
    kimg_stages: list[float] = Field([4000, 2000, 2000], description="kimg of each stage; one backbone added per stage")
    label_smooth: float = Field(0.2, ge=0, lt=1, description="one-sided: real targets 1 - this")
    ada_target: float = Field(0.3, gt=0, lt=1, description="target of each backbone's own ADA p")
    probe_images: int = Field(10_000, ge=8, description="real images (un-augmented, from the data set; all of a "
                                                         "smaller set) and as many generated ones per linear probe")

    @field_validator("weights")
    @classmethod
    def _absolute(cls, v: dict[str, str]) -> dict[str, str]:
        # Resolved where the spec is first read (the driver): Ray workers run in other folders.
        return {k: str(Path(p).expanduser().absolute()) for k, p in v.items()}

    @model_validator(mode="after")
    def _enough_candidates(self) -> "VisionAidedConfig":
        if len(self.kimg_stages) > len(self.candidates):
            raise ValueError(f"{len(self.kimg_stages)} stages need at least as many candidates, "
                             f"got {len(self.candidates)}")
        if len(set(self.candidates)) != len(self.candidates):
            raise ValueError("candidates must not repeat")
        return self


class StyleGAN2Config(FamilyConfig):
    """Defaults: StyleGAN2-ADA's `paper256_2fmap` as SCB-GAN ran it (MINEAUG.md §4)."""

    z_dim: int = Field(512, ge=1)
    w_dim: int = Field(512, ge=1)
    mapping_layers: int = Field(8, ge=1)
    channel_base: int = Field(32768, ge=1)
    channel_max: int = Field(512, ge=1)
    architecture: Literal["skip", "resnet"] = Field("skip", description="the generator's output layout")
    mbstd_group: int = Field(4, ge=1)
    conv_clamp: float | None = Field(256, gt=0)
    r1_gamma: float = Field(1.0, ge=0)
    r1_every: int = Field(16, ge=1)
    pl_weight: float = Field(2.0, ge=0)
    pl_every: int = Field(4, ge=1)
    style_mixing: float = Field(0.9, ge=0, le=1)
    ema_kimg: float = Field(10.0, gt=0, description="half-life of the generator EMA in kimg")
    beta1: float = Field(0.0, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    vision_aided: VisionAidedConfig | None = Field(VisionAidedConfig(), description="null: plain StyleGAN2-ADA")


class SCBDiscriminator(nn.Module):
    """StyleGAN2's discriminator and the vision-aided heads: trained together in phase "D"."""

    def __init__(self, main: StyleGAN2Discriminator, heads: VisionAidedHeads | None):
        super().__init__()
        self.main, self.heads = main, heads

    def forward(self, images: Tensor, features: dict[str, list[Tensor]] | None = None
                ) -> tuple[Tensor, dict[str, list[Tensor]]]:
        logits = self.main(images)
        return logits, (self.heads(features) if features else {})


class MappedGenerator(nn.Module):
    """The generator as one call (so DDP / DeepSpeed see every use in the wrapped forward):
    z -> images, with optional style mixing and the w's returned for path-length."""

    def __init__(self, g: StyleGAN2Generator):
        super().__init__()
        self.g = g

    def forward(self, z: Tensor, mixing: float = 0.0, return_ws: bool = False, noise_mode: str = "random",
                update_w_avg: bool = False):
        ws = (style_mixing_ws(self.g.mapping, z, mixing, self.g.num_ws, update_w_avg=update_w_avg) if mixing > 0
              else self.g.mapping(z, update_w_avg=update_w_avg))
        img = self.g.synthesis(ws, noise_mode=noise_mode)
        return (img, ws) if return_ws else img


class StyleGAN2(Family):
    name = "stylegan2"
    config_cls = StyleGAN2Config
    ada_config = AdaSettings
    conditional = False
    metrics = ("fid", "kid", "pr")
    sampler_role = "G_ema"
    # Plain StyleGAN2-ADA: the vision-aided heads need backbone weight files.
    tiny = {"data.resolution": 16, "model.z_dim": 16, "model.w_dim": 16, "model.mapping_layers": 2,
            "model.channel_base": 128, "model.channel_max": 16, "model.vision_aided": None}

    # fp16's range (65504) is too small for the modulated activations before demodulation and for
    # R1's gradients; bf16 has fp32's range.
    precisions = ("fp32", "bf16")
    # G's buffers: `noise_const` and the FIR kernels are constants (seeded build, checkpoints);
    # `w_avg` does differ by rank (each rank updates it from its own latents), but only rank 0's
    # copy reaches G_ema, checkpoints and samples, and rank 0 never receives another rank's copy,
    # so it is the same with or without the broadcast; and no forward on any rank reads it, the
    # spread evaluation's sampling included (truncation, psi < 1, is never used). D's buffers are
    # FIR kernels. Saves one broadcast of every noise map per G forward.
    broadcast_buffers = False

    config: StyleGAN2Config

    def __init__(self, config: StyleGAN2Config, *, resolution: int, channels: int, lr: float,
                 ada: AdaSettings | None = None):
        super().__init__(config, resolution=resolution, channels=channels, lr=lr)
        if resolution < 8 or resolution & (resolution - 1):
            raise ValueError(f"stylegan2 needs a power-of-two data.resolution >= 8, got {resolution}")
        self.ada_settings = ada
        self.ada = (AdaptiveAugment(channels, target=ada.target, interval=ada.interval, speed_kimg=ada.speed_kimg,
                                    p=ada.initial_p) if ada else None)
        self.backbones: dict[str, nn.Module] = {}
        va = config.vision_aided
        self.head_ada = {k: AdaptiveAugment(channels, target=va.ada_target) for k in va.candidates} if va else {}
        self.active: list[str] = []          # backbones added so far, in order
        self.pl = PathLengthPenalty()

    # ---- set-up -------------------------------------------------------------------------
    def build(self) -> dict[str, nn.Module]:
        c = self.config
        g = StyleGAN2Generator(z_dim=c.z_dim, w_dim=c.w_dim, resolution=self.resolution, channels=self.channels,
                      channel_base=c.channel_base, channel_max=c.channel_max, mapping_layers=c.mapping_layers,
                      architecture=c.architecture, conv_clamp=c.conv_clamp)
        d = StyleGAN2Discriminator(resolution=self.resolution, channels=self.channels, channel_base=c.channel_base,
                          channel_max=c.channel_max, mbstd_group=c.mbstd_group, conv_clamp=c.conv_clamp)
        va = c.vision_aided
        heads = VisionAidedHeads({k: feature_dims(k, va.size) for k in va.candidates}) if va else None
        G = MappedGenerator(g)
        return {"G": G, "D": SCBDiscriminator(d, heads), "G_ema": copy.deepcopy(G).eval().requires_grad_(False)}

    def phases(self) -> list[Phase]:
        betas = (self.config.beta1, self.config.beta2)
        return [Phase("D", self.lr, betas, param_groups=self._d_groups), Phase("G", self.lr, betas)]

    def _d_groups(self, d: "SCBDiscriminator") -> list[list[nn.Parameter]]:
        """StyleGAN2's discriminator, then one group per backbone's heads (fresh state per stage)."""
        va = self.config.vision_aided
        heads = [list(d.heads.parameters_of(kind)) for kind in va.candidates] if va else []
        return [list(d.main.parameters()), *heads]

    def needs_double_backward(self) -> bool:
        return self.config.r1_gamma > 0 or self.config.pl_weight > 0

    def required_files(self) -> dict[str, str | None]:
        va = self.config.vision_aided
        return {f"model.vision_aided.weights.{k}": va.weights.get(k) for k in va.candidates} if va else {}

    def _load_backbones(self, device: torch.device) -> None:
        va = self.config.vision_aided
        if va is None or self.backbones:
            return
        for kind in va.candidates:
            path = va.weights.get(kind)
            if not path:
                raise FileNotFoundError(f"model.vision_aided.weights.{kind}: no weights file named for candidate "
                                        f"backbone {kind!r} (a local file; see jobs/specs/scbgan_rosetta.yaml)")
            options = {"act": va.clip_activation} if kind == "clip_vitb32" else {}
            self.backbones[kind] = build_backbone(kind, path, size=va.size, **options).to(device)
            self.head_ada[kind].to(device)

    # ---- one step -----------------------------------------------------------------------
    def _augment(self, x: Tensor) -> Tensor:
        return self.ada(x) if self.ada is not None else x

    def _features(self, x: Tensor, *, grad: bool) -> dict[str, list[Tensor]]:
        """Backbone features of the active backbones, each behind its own ADA pipeline."""
        out = {}
        for kind in self.active:
            with torch.set_grad_enabled(grad):
                out[kind] = self.backbones[kind](self.head_ada[kind](x))
        return out

    def _latents(self, n: int, ctx: StepContext) -> Tensor:
        return torch.randn(n, self.config.z_dim, device=ctx.device, generator=ctx.generator)

    def loss(self, batch: Mapping[str, Tensor], ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        self._load_backbones(ctx.device)
        if self.ada is not None:
            self.ada.to(ctx.device)
        real = batch["image"]
        z = self._latents(real.shape[0], ctx)
        if ctx.phase == "D":
            return self._d_loss(real, z, ctx)
        if ctx.phase == "G":
            return self._g_loss(z, ctx)
        raise ValueError(f"{self.name} has phases 'D' and 'G', got {ctx.phase!r}")

    def _d_loss(self, real: Tensor, z: Tensor, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        c, va = self.config, self.config.vision_aided
        d = ctx.net("D")
        with torch.no_grad():
            fake = ctx.net("G")(z, mixing=c.style_mixing)
        do_r1 = c.r1_gamma > 0 and ctx.step % c.r1_every == 0
        real_in = self._augment(real).detach()
        real_logits, real_heads = d(real_in, self._features(real, grad=False))
        fake_logits, fake_heads = d(self._augment(fake), self._features(fake, grad=False))
        loss = F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()
        logs: dict[str, Tensor] = {"loss_D": loss.detach(), "D_real_sign": real_logits.detach().sign().mean()}
        if self.ada is not None:
            self.ada.observe(real_logits)
        if do_r1:
            # Its own forward through the bare module: DeepSpeed treats any backward pass over its
            # engine's graph, autograd.grad's included, as the training backward.
            # The gradient is taken w.r.t. the un-augmented reals, through the (differentiable) ADA
            # pipeline, as StyleGAN2-ADA does; here with a fresh draw of its parameters.
            r1_in = real.detach().requires_grad_(True)
            r1 = r1_penalty(ctx.networks["D"].main(self._augment(r1_in)), r1_in).mean()
            loss = loss + c.r1_gamma / 2 * r1 * c.r1_every
            logs["r1"] = r1.detach()
        if va is not None:
            if self.active:
                vloss = heads_d_loss(real_heads, fake_heads, label_smooth=va.label_smooth)
                loss = loss + vloss
                logs["loss_D_vision"] = vloss.detach()
                for kind in self.active:   # each backbone's ADA follows its own head on the reals
                    self.head_ada[kind].observe(real_heads[kind][-1])
            # Heads not added yet: an exact zero gradient keeps them still and in the graph.
            idle = [p for kind in va.candidates if kind not in self.active for p in _heads_of(ctx, kind)]
            if idle:
                loss = loss + 0.0 * sum(p.sum() for p in idle)
        return loss, logs

    def _g_loss(self, z: Tensor, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        c, va = self.config, self.config.vision_aided
        g, d = ctx.net("G"), ctx.net("D")
        do_pl = c.pl_weight > 0 and ctx.step % c.pl_every == 0
        # w_avg (the truncation centre) follows the latents of the generator's own steps.
        fake = g(z, mixing=c.style_mixing, update_w_avg=True)
        fake_logits, fake_heads = d(self._augment(fake), self._features(fake, grad=True))
        loss = F.softplus(-fake_logits).mean()
        logs: dict[str, Tensor] = {"loss_G": loss.detach()}
        if va is not None and self.active:
            vloss = heads_g_loss(fake_heads, label_smooth=va.label_smooth)
            loss = loss + vloss
            logs["loss_G_vision"] = vloss.detach()
        if do_pl:
            # As StyleGAN2, on half the batch in a forward of its own (through the bare module, like R1).
            pl_fake, pl_ws = ctx.networks["G"](z[: max(1, len(z) // 2)], mixing=c.style_mixing, return_ws=True)
            pl = self.pl(pl_fake, pl_ws)
            loss = loss + c.pl_weight * pl * c.pl_every
            logs["pl_penalty"] = pl.detach()
        return loss, logs

    # ---- between steps ------------------------------------------------------------------
    def after_step(self, end: StepEnd) -> dict[str, float | Tensor]:
        c = self.config
        logs: dict[str, float | Tensor] = {}
        g, g_ema = end.networks["G"], end.networks["G_ema"]
        update_ema(g_ema, g, keep=0.5 ** (end.batch / (c.ema_kimg * 1000)))
        if self.ada_settings is not None and end.step % self.ada_settings.interval == 0:
            logs["ada_p"] = self._adjust(self.ada, end, end.batch * self.ada_settings.interval)
        for kind in self.active:   # each backbone's own p adapts whether or not the main ADA is on
            head_ada = self.head_ada[kind]
            if end.step % head_ada.interval == 0:
                logs[f"ada_p_{kind}"] = self._adjust(head_ada, end, end.batch * head_ada.interval)
        va = c.vision_aided
        if va is not None:
            if self._stage_due(end.images_seen):   # the same answer on every rank: from the image count
                kind, accuracies = end.on_rank0(lambda: self._probe(end))   # minutes of work on rank 0
                self.active.append(kind)
                end.restart_optimizer("D", list(end.networks["D"].heads.parameters_of(kind)))
                logs.update({f"probe_acc_{k}": v for k, v in accuracies.items()})
            logs["vision_stage"] = float(len(self.active))
        return logs

    @staticmethod
    def _adjust(ada: AdaptiveAugment, end: StepEnd, images: int) -> Tensor:
        # On the device: the mean over ranks has the same ratio as the sum; nothing read back.
        return ada.adjust_from_stats(end.mean_over_ranks(ada.take_stats().to(end.device)), images)

    def _stage_due(self, images_seen: int) -> bool:
        """Whether the next backbone is due: the warm-up and every earlier stage are done."""
        va = self.config.vision_aided
        if len(self.active) >= len(va.kimg_stages):
            return False
        start = va.warmup_kimg + sum(va.kimg_stages[:len(self.active)])
        return images_seen >= start * 1000

    @torch.no_grad()
    def _probe(self, end: StepEnd) -> tuple[str, dict[str, float]]:
        """The backbone (not yet added) whose pooled features best separate reals from G_ema's images.

        As the vision-aided reference: the reals are the data set's own images (up to
        `probe_images`, all of a smaller set), never the MineAug/ADA-augmented batches; as many
        fakes from random latents; each side split 50/50 for the logistic-regression probe."""
        self._load_backbones(end.device)
        kinds = [kind for kind in self.backbones if kind not in self.active]
        real = {kind: [] for kind in kinds}
        fake = {kind: [] for kind in kinds}
        count = 0
        for x in end.reals(self.config.vision_aided.probe_images):   # in batches: no set held in memory
            g = self.sample(end.networks["G_ema"], len(x), seed=10_000 + count).to(end.device)
            for kind in kinds:
                real[kind].append(self.backbones[kind].pooled(x).cpu())
                fake[kind].append(self.backbones[kind].pooled(g).cpu())
            count += len(x)
        if count < PROBE_MIN_IMAGES:
            raise RuntimeError(f"model.vision_aided: the linear probe read {count} real images from the data set; "
                               f"it needs at least {PROBE_MIN_IMAGES}")
        pooled = {kind: (torch.cat(real[kind]), torch.cat(fake[kind])) for kind in kinds}
        return choose_backbone(pooled)

    # ---- state outside the networks --------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"active": list(self.active),
                "ada_p": float(self.ada.p) if self.ada is not None else None,
                "head_ada_p": {k: float(a.p) for k, a in self.head_ada.items()},
                "pl_mean": self.pl.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.active = list(state["active"])
        if self.ada is not None and state["ada_p"] is not None:
            self.ada.set_p(state["ada_p"])
        for kind, p in state["head_ada_p"].items():
            self.head_ada[kind].set_p(p)
        self.pl.load_state_dict(state["pl_mean"])

    @torch.no_grad()
    def sample(self, sampler: nn.Module, n: int, *, seed: int = 0, cond: Tensor | None = None,
               mask: Tensor | None = None) -> Tensor:
        if cond is not None or mask is not None:
            raise ValueError(f"{self.name} is unconditional: sample() takes no cond or mask")
        z = torch.randn(n, self.config.z_dim, generator=torch.Generator().manual_seed(int(seed)))
        # The synthesis network's output is unbounded (no tanh); the reference clips it where it
        # writes images, (x·127.5 + 128).clamp(0, 255); the contract's range is [-1, 1].
        return run_in_eval(_Const(sampler), z).clamp(-1, 1)

    @torch.no_grad()
    def sample_seeds(self, sampler: nn.Module, seeds: list[int], *, cond: Tensor | None = None,
                     mask: Tensor | None = None) -> Tensor:
        """`Family.sample_seeds` in one forward: image i's latent is what `sample(sampler, 1,
        seed=seeds[i])` draws; the fixed noise inputs and the clamp as `sample`."""
        if cond is not None or mask is not None:
            raise ValueError(f"{self.name} is unconditional: sample_seeds() takes no cond or mask")
        if not seeds:
            raise ValueError(f"{self.name}: sample_seeds() needs at least one seed")
        z = torch.cat([torch.randn(1, self.config.z_dim, generator=torch.Generator().manual_seed(int(s)))
                       for s in seeds])
        return run_in_eval(_Const(sampler), z).clamp(-1, 1)


class _Const(nn.Module):
    """Sampling with the fixed noise inputs: a seed gives the same image anywhere."""

    def __init__(self, g: nn.Module):
        super().__init__()
        self.g = g

    def forward(self, z: Tensor) -> Tensor:
        return self.g(z, noise_mode="const")


def _heads_of(ctx: StepContext, kind: str) -> list[nn.Parameter]:
    return list(ctx.networks["D"].heads.parameters_of(kind))
