"""What every GAN family shares: the standard objective on logits (Goodfellow et al. 2014) and
the two players' optimiser settings.

Logits may be one per image (DCGAN) or one per patch (PatchGAN): means run over all of them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from models.family import FamilyConfig, Phase


def discriminator_loss(logit_real: Tensor, logit_fake: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Cross-entropy of real -> 1 and fake -> 0, and what to log: D's mean belief on each side."""
    loss = (F.binary_cross_entropy_with_logits(logit_real, torch.ones_like(logit_real))
            + F.binary_cross_entropy_with_logits(logit_fake, torch.zeros_like(logit_fake)))
    return loss, {"D_real": torch.sigmoid(logit_real.detach()).mean(),
                  "D_fake": torch.sigmoid(logit_fake.detach()).mean()}


def generator_loss(logit_fake: Tensor) -> Tensor:
    """Non-saturating: maximise log D(G(z)) rather than minimise log(1 - D(G(z)))."""
    return F.binary_cross_entropy_with_logits(logit_fake, torch.ones_like(logit_fake))


class TwoPlayerConfig(FamilyConfig):
    """Optimiser settings of a GAN's two players; defaults are DCGAN's Adam(2e-4, β1 = 0.5)
    (train.lr supplies the 2e-4 unless a player sets its own)."""

    lr_g: float | None = Field(None, gt=0, description="generator learning rate; None -> train.lr")
    lr_d: float | None = Field(None, gt=0, description="discriminator learning rate; None -> train.lr")
    beta1: float = Field(0.5, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)


def two_player_phases(config: TwoPlayerConfig, lr: float, order: tuple[str, str] = ("G", "D"),
                      **generator_schedule) -> list[Phase]:
    """Phases "G" and "D" in `order`. G first by default: one generator forward per step serves
    both players (the G phase keeps its detached fakes for the D phase of the same step, since the
    train loop builds no graph through G while D trains), as the references' one fake per step does;
    they update D first, so there G's loss sees the D of after this step's update, here the one
    before it. ("D", "G") suits a family whose D phase makes its own fakes."""
    if sorted(order) != ["D", "G"]:
        raise ValueError(f"order must name the phases 'D' and 'G' once each, got {order!r}")
    betas = (config.beta1, config.beta2)
    phases = {"D": Phase("D", config.lr_d if config.lr_d is not None else lr, betas),
              "G": Phase("G", config.lr_g if config.lr_g is not None else lr, betas, **generator_schedule)}
    return [phases[name] for name in order]
