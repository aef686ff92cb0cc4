"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric") with its published weights, read from a local file: nothing is downloaded.

The distance of two images: both go through a backbone (AlexNet or VGG-16 `features`, cut after
five ReLUs); each of the five activations is unit-normalised along channels, the squared
difference is weighted per channel by a learned 1x1 convolution (`lin0`..`lin4`), averaged over
space, and the five are summed. Inputs are in [-1, 1] and are first shifted and scaled per
channel by the published constants (`SHIFT`, `SCALE`).

The weights file is a state dict in the layout of the reference implementation's whole module
(richzhang/PerceptualSimilarity `lpips.LPIPS`, and torchmetrics' copy of it), which is also what
`torch.save(lpips.LPIPS(net="alex").state_dict(), path)` writes:
  net.slice1.0.weight, net.slice1.0.bias, ... net.slice5.N.bias   the backbone, by the index of
                                                                  the layer in torchvision's
                                                                  `features`
  lin0.model.1.weight ... lin4.model.1.weight                     (1, C, 1, 1) per layer
  scaling_layer.shift / .scale (optional)                         must equal the constants
The reference's own `weights/v0.1/alex.pth` holds only the `lin*` keys (its backbone comes from
torchvision's ImageNet weights): save the whole module once where the backbone can be had.
The backbone's layers are built here, as torchvision builds them (torchvision is not needed).
Which backbone is read from the channels of `lin*`.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from models.metrics.extractors import rgb_view

_SLICE = re.compile(r"^net\.slice([1-5])\.(\d+\.(?:weight|bias))$")
_LIN = re.compile(r"^lins?\.?([0-4])\.model\.1\.weight$")
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# Per backbone: the channels of the five compared activations, and where `features` is cut
# (slice k holds layers [cut[k-1], cut[k]) ).
BACKBONES = {
    "alex": ((64, 192, 384, 256, 256), (0, 2, 5, 8, 10, 12)),
    "vgg": ((64, 128, 256, 512, 512), (0, 4, 9, 16, 23, 30)),
}


# The layers of torchvision's `alexnet().features` and `vgg16().features`, by index (the keys of
# the weights file name them so); built here, since torchvision is not a dependency. A number is a
# conv's output channels, "M" a max-pool.
ALEX = ((64, 11, 4, 2), "M", (192, 5, 1, 2), "M", (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1), "M")
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _features(kind: str) -> list[nn.Module]:
    """The backbone's layers, untrained (the file supplies every weight), in torchvision's order:
    each conv followed by its ReLU."""
    layers: list[nn.Module] = []
    c = 3
    for item in (ALEX if kind == "alex" else VGG16):
        if item == "M":
            layers.append(nn.MaxPool2d(3, 2) if kind == "alex" else nn.MaxPool2d(2, 2))
            continue
        out, k, stride, pad = item if kind == "alex" else (item, 3, 1, 1)
        layers += [nn.Conv2d(c, out, k, stride, pad), nn.ReLU()]
        c = out
    return layers


class LPIPS(nn.Module):
    """distance(a, b) -> (N,) for float NCHW images in [-1, 1] (1 channel is repeated to 3); 0 for equal images."""

    def __init__(self, weights: str | Path):
        super().__init__()
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"eval.lpips_weights: no file at {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.kind = _backbone_of(state, path)
        channels, cut = BACKBONES[self.kind]
        features = _features(self.kind)
        self.slices = nn.ModuleList()
        for k in range(5):
            s = nn.Sequential()
            for i in range(cut[k], cut[k + 1]):
                s.add_module(str(i), features[i])
            self.slices.append(s)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in channels)
        self._load(state, path)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()
        self.name = f"lpips-{self.kind}/{_file_hash(path)}"

    def _load(self, state: dict, path: Path) -> None:
        ours, unknown = {}, []
        for key, value in state.items():
            if m := _SLICE.match(key):
                ours[f"slices.{int(m[1]) - 1}.{m[2]}"] = value
            elif m := _LIN.match(key):      # `lin3.` and, in torchmetrics' copy, the same tensor as `lins.3.`
                ours[f"lins.{m[1]}.weight"] = value
            elif key in ("scaling_layer.shift", "scaling_layer.scale"):
                want = torch.tensor(SHIFT if key.endswith("shift") else SCALE)
                if not torch.allclose(value.flatten().float(), want):
                    raise ValueError(f"eval.lpips_weights {path}: {key} is not LPIPS's constant {want.tolist()}")
            else:
                unknown.append(key)
        missing, unexpected = self.load_state_dict(ours, strict=False)
        unexpected = [*unexpected, *unknown]
        if missing or unexpected:
            raise ValueError(f"eval.lpips_weights {path}: not an LPIPS state dict (missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}); see models/metrics/lpips.py for the layout")

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)   # a metric: dropout and the like never switch on

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        device, dtype = self.shift.device, self.lins[0].weight.dtype
        xa, xb = ((rgb_view(x).to(device, dtype) - self.shift) / self.scale for x in (a, b))
        total = 0
        for block, lin in zip(self.slices, self.lins):
            xa, xb = block(xa), block(xb)
            total = total + lin((_unit(xa) - _unit(xb)).pow(2)).mean(dim=(1, 2, 3))
        return total


def _unit(f: Tensor, eps: float = 1e-10) -> Tensor:
    """Unit length along channels, as the reference normalises (norm + eps, not sqrt(sum + eps))."""
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def _backbone_of(state: dict, path: Path) -> str:
    found = tuple(state[k].shape[1] for k in (f"lin{i}.model.1.weight" for i in range(5)) if k in state)
    for kind, (channels, _) in BACKBONES.items():
        if found == channels:
            return kind
    raise ValueError(f"eval.lpips_weights {path}: the lin0..lin4 weights have {found or 'no'} channels; LPIPS's "
                     f"AlexNet has {BACKBONES['alex'][0]}, its VGG-16 {BACKBONES['vgg'][0]}")


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]
