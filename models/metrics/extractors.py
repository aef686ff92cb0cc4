"""Feature extractors for FID, KID and precision/recall, chosen by name.

All take uint8 NCHW images with 1, 3 or more channels (grey is repeated to RGB, extra bands
beyond the first three are dropped) and return float features (N, num_features). Nothing is
downloaded: `randconv` needs no file at all, `inception` (and `VGG16Extractor`, the feature
space of precision/recall) read a local TorchScript file.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def rgb_view(x: Tensor) -> Tensor:
    """NCHW with C = 1, 3 or more -> N3HW of any dtype (grey repeated; bands past the third dropped)."""
    if x.dim() != 4:
        raise ValueError(f"expected NCHW images, got shape {tuple(x.shape)}")
    c = x.shape[1]
    if c == 1:
        return x.expand(-1, 3, -1, -1)
    if c == 2:
        raise ValueError("2-channel images have no RGB reading; convert them before computing FID")
    return x[:, :3]


def to_rgb(x_uint8: Tensor) -> Tensor:
    """uint8 NCHW with C = 1, 3 or more -> uint8 N3HW (see `rgb_view`)."""
    if x_uint8.dtype != torch.uint8:
        raise TypeError(f"feature extractors take uint8 images in [0, 255], got {x_uint8.dtype}")
    return rgb_view(x_uint8)


def _splitmix64_uniform(seed: int, n: int) -> np.ndarray:
    """n floats uniform in [-1, 1) from a counter-based integer hash (splitmix64).

    Pure uint64 arithmetic: the numbers are the same on every machine and for every numpy /
    torch version, which torch's own generators do not promise across releases.
    """
    with np.errstate(over="ignore"):
        z = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (2.0 / 2**53) - 1.0


class RandConvExtractor(nn.Module):
    """A small fixed random convolutional network: 64-d features, no weights file needed.

    Four 3x3 convs with ReLU (three of stride 2) on the image resized to 64x64, then global
    average pooling. Weights are He-scaled uniform numbers from a fixed seed, identical in
    every process and version. Random conv features separate image distributions well enough
    to compare runs and to track training, but FIDs measured with them are on their own
    scale: they are NOT comparable to published (Inception-v3) FIDs. Use `inception` for those.
    """

    name = "orbitgen-randconv64-v1"
    num_features = 64
    size = 64
    seed = 20_261_121
    # (in, out, stride): 64 -> 32 -> 16 -> 8 -> 8
    layers = ((3, 16, 2), (16, 32, 2), (32, 64, 2), (64, 64, 1))

    def __init__(self) -> None:
        super().__init__()
        for i, (c_in, c_out, _) in enumerate(self.layers):
            fan_in = c_in * 9
            # Uniform on [-a, a] has variance a^2 / 3; a = sqrt(6 / fan_in) is He's gain for ReLU.
            u = _splitmix64_uniform(self.seed + 1000 * i, c_out * fan_in)
            w = torch.from_numpy(u * np.sqrt(6.0 / fan_in)).float().reshape(c_out, c_in, 3, 3)
            # Buffers, not parameters: they follow .to(device) but are never trained or saved as weights.
            self.register_buffer(f"w{i}", w, persistent=False)

    def feature_maps(self, x: Tensor) -> list[Tensor]:
        """Every layer's activations for float RGB input scaled as `(x / 255 - 0.5) / 0.25`, at any
        size; differentiable (the perceptual distance of `models.metrics.perceptual` uses it)."""
        maps = []
        for i, (_, _, stride) in enumerate(self.layers):
            x = F.relu(F.conv2d(x, getattr(self, f"w{i}"), stride=stride, padding=1))
            maps.append(x)
        return maps

    @torch.no_grad()
    def forward(self, x_uint8: Tensor) -> Tensor:
        x = to_rgb(x_uint8).to(self.w0.device, torch.float32)
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        x = (x / 255.0 - 0.5) / 0.25   # roughly zero-mean, unit-scale input
        return self.feature_maps(x)[-1].mean(dim=(2, 3))


class TorchScriptExtractor(nn.Module):
    """A frozen feature network of NVIDIA's, shipped as a TorchScript file, read from a local path.

    Called as StyleGAN2-ADA calls it: uint8-valued RGB NCHW (as float) at the native resolution
    with `return_features=True`; the file resizes and normalises inside. Subclasses name the file,
    the spec key that points at it, and the feature width.
    """

    name: str
    num_features: int
    label: str        # what the error messages call it
    file_name: str
    about: str
    spec_key: str
    otherwise: str    # the way out when the file is missing

    def __init__(self, weights_path: str | os.PathLike[str] | None):
        super().__init__()
        if weights_path is None or not os.path.isfile(weights_path):
            where = "no path was given" if weights_path is None else f"no file at {os.fspath(weights_path)!r}"
            raise FileNotFoundError(
                f"{self.label} weights not found: {where}. They cannot be downloaded here. Copy NVIDIA's "
                f"{self.file_name} ({self.about}) onto this machine and set the spec key {self.spec_key} to "
                f"its path, {self.otherwise}."
            )
        with warnings.catch_warnings():
            # torch.jit is deprecated in recent torch, but NVIDIA ships these networks only as TorchScript.
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*deprecated", category=DeprecationWarning)
            self.model = torch.jit.load(os.fspath(weights_path), map_location="cpu")
        self.model.eval()
        for p in self.model.parameters():   # ScriptModules refuse .requires_grad_()
            p.requires_grad_(False)
        self.weights_path = os.fspath(weights_path)

    def train(self, mode: bool = True) -> "TorchScriptExtractor":
        super().train(False)   # a frozen detector: stays in eval mode whatever the caller asks
        return self

    @torch.no_grad()
    def forward(self, x_uint8: Tensor) -> Tensor:
        param = next(self.model.parameters(), None)
        device = param.device if param is not None else x_uint8.device
        x = to_rgb(x_uint8).to(device, torch.float32)   # same values as uint8; the model casts to float itself
        feats = self.model(x, return_features=True)
        if feats.dim() != 2 or feats.shape[1] != self.num_features:
            raise ValueError(
                f"{self.weights_path} returned features of shape {tuple(feats.shape)}, expected "
                f"(N, {self.num_features}); is it {self.file_name}?"
            )
        return feats


class InceptionExtractor(TorchScriptExtractor):
    """Inception-v3 pool features (2048-d) from NVIDIA's TorchScript file `inception-2015-12-05.pt`.

    It is the network of StyleGAN2-ADA's and Clean-FID's metrics (the TensorFlow FID Inception
    translated to PyTorch), so FIDs from it are comparable with published numbers (given the same
    number of samples). Inside, it resizes to 299x299 and normalises with (x - 128) / 128.
    """

    name = "inception-v3-2015-12-05"
    num_features = 2048
    label = "Inception"
    file_name = "inception-2015-12-05.pt"
    about = "the TorchScript Inception-v3 of StyleGAN2-ADA / Clean-FID"
    spec_key = "eval.inception_weights"
    otherwise = "or use the 'randconv' extractor"


class VGG16Extractor(TorchScriptExtractor):
    """VGG-16 features (4096-d) from NVIDIA's TorchScript file `vgg16.pt`, the feature space
    of StyleGAN2-ADA's precision/recall (pr50k3), so values from it compare with published ones."""

    name = "vgg16-stylegan2-ada"
    num_features = 4096
    label = "VGG-16"
    file_name = "vgg16.pt"
    about = "the TorchScript VGG-16 of StyleGAN2-ADA's precision/recall metric"
    spec_key = "eval.vgg_weights"
    otherwise = "or leave it unset to measure precision/recall in the FID extractor's feature space"


class _FeatureLists(Metric):
    """The features of both sides as torchmetrics list states (so they can be reset like any metric)."""

    full_state_update = False

    def __init__(self) -> None:
        # Local only: evaluation runs on rank 0 alone, and a synchronising compute() would hang.
        super().__init__(sync_on_compute=False, dist_sync_on_step=False)
        self.add_state("real", default=[], dist_reduce_fx="cat")
        self.add_state("fake", default=[], dist_reduce_fx="cat")

    def update(self, features: Tensor, real: bool) -> None:
        (self.real if real else self.fake).append(features)

    def cat(self, side: str) -> Tensor:
        feats = getattr(self, side)
        return dim_zero_cat(feats) if feats else torch.zeros(0, 0)

    def compute(self) -> dict[str, Tensor]:
        return {side: self.cat(side) for side in ("real", "fake")}


class FeatureMetric:
    """A set-level metric in an extractor's feature space: add uint8 NCHW batches of either side
    in any order (or their features, when one extractor pass serves several metrics), then
    `compute()`. Subclasses keep what they need of the features (`_add`). None synchronises
    across processes: use them where all the images are (e.g. rank 0)."""

    def __init__(self, extractor: nn.Module, device: str | torch.device = "cpu"):
        self.extractor = extractor.to(device)
        self.device = device
        self.counts = {"real": 0, "fake": 0}

    @torch.no_grad()
    def extract(self, batch: Tensor) -> Tensor:
        if not isinstance(batch, Tensor) or batch.dtype != torch.uint8 or batch.dim() != 4:
            got = f"{batch.dtype} {tuple(batch.shape)}" if isinstance(batch, Tensor) else type(batch).__name__
            raise TypeError(f"batches must be uint8 NCHW tensors in [0, 255], got {got}")
        return self.extractor(batch.to(self.device))

    def update(self, batch: Tensor, *, real: bool) -> None:
        if isinstance(batch, Tensor) and batch.shape[0] == 0:
            return
        self.update_features(self.extract(batch), real=real)

    def update_features(self, features: Tensor, *, real: bool) -> None:
        """Add features already computed with this metric's extractor."""
        self._add(features.detach(), real)
        self.counts["real" if real else "fake"] += features.shape[0]

    def _add(self, features: Tensor, real: bool) -> None:
        raise NotImplementedError


class FeatureStore(FeatureMetric):
    """Every extractor feature of both sides, kept on the CPU until a set-level metric (KID,
    precision/recall) needs them all at once; FID, by contrast, keeps running sums only."""

    def __init__(self, extractor: nn.Module, device: str | torch.device = "cpu"):
        if not hasattr(extractor, "name"):
            raise TypeError("the extractor must have a str attribute `name` (it is logged with the values)")
        super().__init__(extractor, device)
        self.metric = _FeatureLists()

    def _add(self, features: Tensor, real: bool) -> None:
        self.metric.update(features.to("cpu", torch.float32), real)

    def side(self, which: str) -> Tensor:
        """All features of `which` ("real" or "fake"), (N, num_features)."""
        return self.metric.cat(which)


EXTRACTORS = ("inception", "randconv")


def make_extractor(name: str, weights_path: str | os.PathLike[str] | None = None) -> nn.Module:
    """The feature extractor called `name`; `weights_path` is used by `inception` only."""
    if name == "randconv":
        return RandConvExtractor()
    if name == "inception":
        return InceptionExtractor(weights_path)
    raise ValueError(f"unknown feature extractor {name!r}; allowed: {', '.join(EXTRACTORS)}")
