"""ControlNet (Zhang et al. 2023) for the DDPM UNet of models/nets/ddpm_unet.py.

`ControlNet(base, cond_channels)` is a trainable copy of the base's encoder (time embedding,
input conv, down path, middle; weights copied from the base) that also sees the condition: a
small conv stack maps it to the input conv's width, its last conv zero-initialised, and its
output is added to the copy's input features. A zero-initialised 1x1 conv per skip tensor and
one for the middle turn the copy's features into residuals for the base's decoder.

`ControlledUNet(base, control)` runs base(x, t, control_residuals=control(x, t, cond)). The base
is frozen: its parameters never require gradients (engines optimise only parameters that do, see
jobs/train/engines/) and it always runs in eval mode, so its dropout is off while the control trains,
exactly as when sampling: the control learns corrections to the base that sampling will use, not
to a noisier one. Because every zero conv outputs zeros, a new ControlledUNet predicts exactly
what its base does.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from models.nets.ddpm_unet import DDPMUNet, zero_

HINT_WIDTHS = (16, 32)   # the condition encoder's hidden widths (ControlNet: 16..256, for 8x downsampling)


class ControlNet(nn.Module):
    def __init__(self, base: DDPMUNet, cond_channels: int):
        super().__init__()
        self.encoder = copy.deepcopy(base.encoder).requires_grad_(True)
        width = self.encoder.conv_in.out_channels
        layers: list[nn.Module] = []
        c = cond_channels
        for w in HINT_WIDTHS:
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.SiLU()]
            c = w
        # Same resolution as the image: the UNet works in pixel space, there is no latent to match.
        self.hint = nn.Sequential(*layers, zero_(nn.Conv2d(c, width, 3, padding=1)))
        self.zero_convs = nn.ModuleList(zero_(nn.Conv2d(ch, ch, 1)) for ch in self.encoder.skip_channels)
        self.zero_mid = zero_(nn.Conv2d(self.encoder.mid_channels, self.encoder.mid_channels, 1))

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> list[Tensor]:
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        skips, h, _ = self.encoder(x, t, hint=self.hint(cond))
        return [zc(s) for zc, s in zip(self.zero_convs, skips)] + [self.zero_mid(h)]


class ControlledUNet(nn.Module):
    def __init__(self, base: DDPMUNet, control: ControlNet):
        super().__init__()
        self.base = base.requires_grad_(False).eval()
        self.control = control
        # Set once the base's trained weights are in; a snapshot of a trained network carries it.
        self.register_buffer("base_loaded", torch.tensor(False))

    def load_base(self, state: dict[str, Tensor]) -> None:
        """The trained base's weights, into the base and (ControlNet's init) into the copy."""
        self.base.load_state_dict(state)
        self.control.encoder.load_state_dict({k[len("encoder."):]: v for k, v in state.items()
                                              if k.startswith("encoder.")})
        self.base_loaded.fill_(True)

    def train(self, mode: bool = True) -> "ControlledUNet":
        super().train(mode)
        self.base.eval()
        return self

    def requires_grad_(self, requires_grad: bool = True) -> "ControlledUNet":
        # Whatever asks for the whole network (a generic loop, a test), the base stays frozen.
        self.control.requires_grad_(requires_grad)
        return self

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        return self.base(x, t, control_residuals=self.control(x, t, cond))
