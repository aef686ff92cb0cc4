"""The PatchGAN discriminator of pix2pix: one logit per overlapping patch, on (input, output) pairs.

`n_layers` stride-2 4x4 convs (widths ndf, 2ndf, 4ndf, ...), a stride-1 conv (widths capped
at 8ndf), a stride-1 conv to one channel; LeakyReLU(0.2), BatchNorm on all but the first and the
last. With n_layers = 3 each logit sees a 70x70 patch, and with 6 input channels it has
pix2pix's 2,768,705 parameters.
"""
from __future__ import annotations

from torch import Tensor, nn

from models.nets.dcgan import dcgan_init_


def patch_grid(resolution: int, n_layers: int) -> int:
    """Logits per side at `resolution`: each stride-2 conv halves it, each stride-1 conv takes 1."""
    return resolution // 2**n_layers - 2


def receptive_field(n_layers: int) -> int:
    """Side of the patch each logit sees (70 for n_layers = 3)."""
    field = 1
    for stride in [1, 1] + [2] * n_layers:   # walking back from the output, kernel 4 each
        field = field * stride + (4 - stride)
    return field


class PatchGAN(nn.Module):
    def __init__(self, in_channels: int, *, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c = ndf
        for i in range(1, n_layers + 1):
            stride = 2 if i < n_layers else 1
            c_out = ndf * min(2**i, 8)
            # The last of these widens without shrinking (stride 1), as in pix2pix.
            layers += [nn.Conv2d(c, c_out, 4, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, True)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        dcgan_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)   # (N, 1, h, w) patch logits
