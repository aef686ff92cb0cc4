"""The UNet generator of pix2pix (Isola et al. 2017), optionally with attention gates on the skips.

Encoder: `depth` stride-2 4x4 convs, widths ngf, 2ngf, 4ngf, 8ngf, 8ngf, ... (capped at 8ngf);
LeakyReLU(0.2) before every conv but the first, BatchNorm after every conv but the first and
the innermost. Decoder, innermost first: ReLU, a stride-2 transposed conv, BatchNorm (Tanh on the
outermost), then the encoder feature of the same size is concatenated (the skip). Dropout(0.5)
follows the decoder blocks whose encoder conv keeps the full 8ngf width, the innermost excepted:
three blocks in UNet-256 (depth 8), as in pix2pix. Only the outermost transposed conv has a bias
(the others are followed by BatchNorm). With depth = log2(resolution) the bottleneck is 1x1;
UNet-256 with the defaults has pix2pix's 54,413,955 parameters ("54.414 M", 3 -> 3 channels).

`attention=True` adds an additive attention gate (Oktay et al. 2018, "Attention U-Net") to each
skip: the decoder feature that the skip joins gates it, pixel by pixel, before concatenation.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from models.nets.dcgan import dcgan_init_


def unet_widths(depth: int, ngf: int) -> list[int]:
    """Encoder widths, outermost first: ngf * (1, 2, 4, 8, 8, ...)."""
    return [ngf * min(2**i, 8) for i in range(depth)]


class AttentionGate(nn.Module):
    """x * sigmoid(psi(relu(Wx x + Wg g))): one weight in (0, 1) per pixel of the skip x, computed
    from the skip and the decoder feature g of the same size (1x1 convs)."""

    def __init__(self, skip_channels: int, gate_channels: int, inter_channels: int):
        super().__init__()
        self.w_x = nn.Conv2d(skip_channels, inter_channels, 1, bias=False)
        self.w_g = nn.Conv2d(gate_channels, inter_channels, 1)
        self.psi = nn.Conv2d(inter_channels, 1, 1)

    def forward(self, x: Tensor, g: Tensor) -> Tensor:
        return x * torch.sigmoid(self.psi(torch.relu(self.w_x(x) + self.w_g(g))))


class Pix2PixUNet(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, *, depth: int, ngf: int = 64, dropout: float = 0.5,
                 attention: bool = False):
        super().__init__()
        if depth < 2:
            raise ValueError(f"a UNet needs depth >= 2, got {depth}")
        w = unet_widths(depth, ngf)
        self.downs = nn.ModuleList()
        for i in range(depth):
            if i == 0:
                self.downs.append(nn.Conv2d(in_channels, w[0], 4, 2, 1, bias=False))
                continue
            block = [nn.LeakyReLU(0.2), nn.Conv2d(w[i - 1], w[i], 4, 2, 1, bias=False)]
            if i < depth - 1:   # no BatchNorm at the 1x1 bottleneck (one value per channel)
                block.append(nn.BatchNorm2d(w[i]))
            self.downs.append(nn.Sequential(*block))

        # ups[k] undoes downs[depth - 1 - k]; all but the innermost see [skip, decoder] concatenated.
        self.ups = nn.ModuleList()
        self.gates = nn.ModuleList()
        for i in reversed(range(depth)):
            c_in = w[i] if i == depth - 1 else 2 * w[i]
            if i == 0:
                self.ups.append(nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(c_in, out_channels, 4, 2, 1), nn.Tanh()))
                continue
            block = [nn.ReLU(), nn.ConvTranspose2d(c_in, w[i - 1], 4, 2, 1, bias=False), nn.BatchNorm2d(w[i - 1])]
            if dropout > 0 and 4 <= i <= depth - 2:   # the full-width middle blocks, as pix2pix
                block.append(nn.Dropout(dropout))
            self.ups.append(nn.Sequential(*block))
            if attention:
                self.gates.append(AttentionGate(w[i - 1], w[i - 1], max(1, w[i - 1] // 2)))
        self.depth = depth
        dcgan_init_(self)   # pix2pix initialises as DCGAN: N(0, 0.02)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] % 2**self.depth or x.shape[-2] % 2**self.depth:
            raise ValueError(f"UNet of depth {self.depth} needs sides divisible by {2**self.depth}, got {tuple(x.shape[-2:])}")
        skips = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
        h = skips.pop()   # the bottleneck
        for k, up in enumerate(self.ups):
            h = up(h)
            if skips:
                skip = skips.pop()
                if len(self.gates):
                    skip = self.gates[k](skip, h)
                h = torch.cat([skip, h], dim=1)
        return h
