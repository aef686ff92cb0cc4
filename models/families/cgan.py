"""The spatio-temporal cGANs: past image ⊕ change mask -> future image (SpaceNet-7 style).

`cgan_unet` is pix2pix (UNet generator, PatchGAN on (input, output) pairs, adversarial + λ·L1)
with the 1-channel change mask concatenated to the past image as input; `cgan_attention_unet`
adds attention gates on the UNet's skip connections. The batch carries `cond` (past image),
`mask` (change mask, one channel) and `image` (future image).
"""
from __future__ import annotations

import torch
from torch import Tensor

from models.families.pix2pix import Pix2Pix


class SpatioTemporalCGAN(Pix2Pix):
    data_keys = ("cond", "mask", "image")
    metrics = ("lpips", "ssim", "psnr", "fid", "f1")
    mask_channels = 1

    def generator_input(self, cond: Tensor | None, mask: Tensor | None) -> Tensor:
        if cond is None or mask is None:
            raise ValueError(f"{self.name} needs `cond` (the past image) and `mask` (the change mask)")
        if mask.shape[1] != self.mask_channels:
            raise ValueError(f"{self.name}: the change mask must have {self.mask_channels} channel, got {mask.shape[1]}")
        return torch.cat([cond, mask], dim=1)


class CGANUNet(SpatioTemporalCGAN):
    name = "cgan_unet"


class CGANAttentionUNet(SpatioTemporalCGAN):
    name = "cgan_attention_unet"
    attention = True
