"""`perceptual_randconv`: a perceptual distance with LPIPS's structure (Zhang et al. 2018) on
fixed random convolutions. Published LPIPS, with its learned weights from a local file, is
`models.metrics.lpips`; this one is named for what it is, so nobody takes its values for LPIPS.

LPIPS compares two images layer by layer in a feature network: activations are unit-normalised
along channels, squared differences are weighted per channel, averaged over space and summed
over layers. Its published numbers need VGG/AlexNet weights plus learned per-channel weights
(`eval.lpips_weights`). Without them, this module keeps the structure with the fixed random conv
network of `RandConvExtractor` (all four layers, native resolution) and uniform weights: it
ranks image pairs sensibly and is differentiable (a training loss too), but its values are on
their own scale, NOT comparable with published LPIPS. `name` says which network was used.
"""
from __future__ import annotations

from torch import Tensor, nn

from models.metrics.extractors import RandConvExtractor, rgb_view


def _unit_channels(f: Tensor, eps: float = 1e-10) -> Tensor:
    return f / (f.pow(2).sum(dim=1, keepdim=True) + eps).sqrt()


class PerceptualDistance(nn.Module):
    """distance(a, b) -> (N,) for float NCHW images in [-1, 1] (1, 3 or more channels); 0 for equal images."""

    name = f"perceptual_randconv/{RandConvExtractor.name}/uniform-weights"

    def __init__(self) -> None:
        super().__init__()
        self.net = RandConvExtractor()   # fixed weights, buffers: never trained, never saved

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        # [-1, 1] -> the network's input scale (x / 255 - 0.5) / 0.25 = 2x.
        fa = self.net.feature_maps(2 * rgb_view(a).to(self.net.w0.device, self.net.w0.dtype))
        fb = self.net.feature_maps(2 * rgb_view(b).to(self.net.w0.device, self.net.w0.dtype))
        return sum((_unit_channels(x) - _unit_channels(y)).pow(2).sum(dim=1).mean(dim=(1, 2)) for x, y in zip(fa, fb))
