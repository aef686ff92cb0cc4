"""StyleGAN2 networks (Karras et al., "Analyzing and Improving the Image Quality of StyleGAN", 2020).

Written from the paper's description: equalized learning rate, an 8-layer mapping network, a
synthesis network of weight-(de)modulated 3x3 convolutions grown from a learned 4x4 constant, with
per-layer noise and "skip" (summed RGB outputs) or "resnet" layouts, and a residual discriminator
ending in minibatch standard deviation. Resampling is a separable [1, 3, 3, 1] FIR filter.

Channel widths: min(channel_base // r, channel_max) at resolution r. The generator uses
num_ws = 2 * log2(resolution) - 2 style vectors: one per convolution, the last one for toRGB.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SQRT2 = math.sqrt(2.0)
SQRT_HALF = math.sqrt(0.5)
NOISE_MODES = ("random", "const", "none")


def paper256_kwargs(role: str | None = None) -> dict[str, Any]:
    """StyleGAN2-ADA's `paper256_2fmap` network settings (MINEAUG.md §4). `role` "G" or "D" keeps
    only the keywords that class takes; None gives them all."""
    g = dict(z_dim=512, w_dim=512, mapping_layers=8, channel_base=32768, channel_max=512, conv_clamp=256)
    d = dict(channel_base=32768, channel_max=512, mbstd_group=4, conv_clamp=256)
    if role == "G":
        return g
    if role == "D":
        return d
    if role is None:
        return {**g, **d}
    raise ValueError(f"role must be 'G', 'D' or None, got {role!r}")


def check_resolution(resolution: int) -> int:
    if not isinstance(resolution, int) or resolution < 8 or resolution & (resolution - 1):
        raise ValueError(f"resolution must be a power of two >= 8, got {resolution!r}")
    return resolution.bit_length() - 1


def channels_at(res: int, channel_base: int, channel_max: int) -> int:
    return max(1, min(channel_base // res, channel_max))


# ---- FIR resampling --------------------------------------------------------------------------
def fir_kernel(taps=(1.0, 3.0, 3.0, 1.0)) -> Tensor:
    """2-D separable low-pass filter, normalised to unit DC gain."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    f = torch.outer(f, f)
    return f / f.sum()


def _depthwise(f: Tensor, x: Tensor, gain: float = 1.0) -> Tensor:
    c = x.shape[1]
    return (f * gain).to(x.dtype)[None, None].expand(c, 1, *f.shape).contiguous()


def blur(x: Tensor, f: Tensor, pad: int, gain: float = 1.0) -> Tensor:
    """Zero-padded depthwise filtering, stride 1 (size grows by 2*pad - taps + 1)."""
    return F.conv2d(F.pad(x, [pad] * 4), _depthwise(f, x, gain), groups=x.shape[1])


def downsample2d(x: Tensor, f: Tensor) -> Tensor:
    """Low-pass, then keep every other pixel: H x W -> H/2 x W/2."""
    return F.conv2d(F.pad(x, [1] * 4), _depthwise(f, x), stride=2, groups=x.shape[1])


def upsample2d(x: Tensor, f: Tensor) -> Tensor:
    """Zero-insertion then low-pass (gain 4 restores the mean): H x W -> 2H x 2W."""
    return F.conv_transpose2d(x, _depthwise(f, x, 4.0), stride=2, padding=1, groups=x.shape[1])


def bias_act(x: Tensor, bias: Tensor | None, act: bool, clamp: float | None, gain: float = 1.0) -> Tensor:
    """bias, then lrelu(0.2) scaled by sqrt(2) (keeps unit variance), times `gain`, then the optional
    clamp scaled by the same `gain` (StyleGAN2-ADA's conv_clamp · gain: a residual branch's
    sqrt(1/2) halves the output's range, so its clamp is tightened alike)."""
    if bias is not None:
        x = x + bias.to(x.dtype).reshape(1, -1, *([1] * (x.dim() - 2)))
    if act:
        x = F.leaky_relu(x, 0.2) * SQRT2
    if gain != 1.0:
        x = x * gain
    if clamp is not None:
        x = x.clamp(-clamp * gain, clamp * gain)
    return x


# ---- equalized learning rate -------------------------------------------------------------------
class EqualLinear(nn.Module):
    """Weights stored N(0, 1/lr_multiplier²) and scaled at run time by lr_multiplier/sqrt(fan_in):
    every layer then learns at the same speed under Adam, and lr_multiplier slows this one."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, bias_init: float = 0.0,
                 lr_multiplier: float = 1.0, activation: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full((out_features,), bias_init / lr_multiplier)) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        b = self.bias * self.bias_gain if self.bias is not None else None
        x = F.linear(x, self.weight * self.weight_gain, b)
        return F.leaky_relu(x, 0.2) * SQRT2 if self.activation else x


class EqualConv2d(nn.Module):
    """Equalized-lr convolution with optional 2x FIR up/downsampling, bias, lrelu and clamp."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, bias: bool = True,
                 activation: bool = True, up: bool = False, down: bool = False, conv_clamp: float | None = None):
        super().__init__()
        assert not (up and down)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size ** 2)
        self.k, self.up, self.down, self.activation, self.conv_clamp = kernel_size, up, down, activation, conv_clamp
        self.register_buffer("fir", fir_kernel(), persistent=False)

    def forward(self, x: Tensor, gain: float = 1.0) -> Tensor:
        w = self.weight * self.weight_gain
        if self.down and self.k == 1:
            x = F.conv2d(downsample2d(x, self.fir), w)       # cheaper: filter before the 1x1 conv
        elif self.down:
            # blur with pad (k+1)/2 then a stride-2 valid conv gives exactly H/2.
            x = F.conv2d(blur(x, self.fir, (self.k + 1) // 2), w, stride=2)
        else:
            x = F.conv2d(x, w, padding=self.k // 2)
            if self.up:
                x = upsample2d(x, self.fir)                      # linear ops commute: conv at low res
        return bias_act(x, self.bias, self.activation, self.conv_clamp, gain)


# ---- mapping -----------------------------------------------------------------------------------
class MappingNetwork(nn.Module):
    """z -> w, broadcast to num_ws copies. `w_avg` (a running mean of w) is the truncation centre."""

    def __init__(self, z_dim: int, w_dim: int, num_ws: int, layers: int = 8, lr_multiplier: float = 0.01,
                 w_avg_beta: float = 0.995):
        super().__init__()
        self.z_dim, self.w_dim, self.num_ws, self.w_avg_beta = z_dim, w_dim, num_ws, w_avg_beta
        dims = [z_dim] + [w_dim] * layers
        self.fcs = nn.ModuleList(EqualLinear(a, b, lr_multiplier=lr_multiplier, activation=True)
                                 for a, b in zip(dims[:-1], dims[1:]))
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z: Tensor, psi: float = 1.0, update_w_avg: bool = False) -> Tensor:
        # Normalise z to unit second moment: only its direction matters.
        x = z.float() * (z.float().square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()
        for fc in self.fcs:
            x = fc(x)
        if update_w_avg:
            with torch.no_grad():
                self.w_avg.copy_(x.detach().float().mean(0).lerp(self.w_avg, self.w_avg_beta))
        if psi != 1:
            x = self.w_avg.to(x.dtype).lerp(x, psi)
        return x.unsqueeze(1).repeat(1, self.num_ws, 1)


# ---- synthesis ---------------------------------------------------------------------------------
def modulated_conv2d(x: Tensor, weight: Tensor, styles: Tensor, *, demodulate: bool = True, up: bool = False,
                     fir: Tensor | None = None) -> Tensor:
    """Per-sample weight modulation, done on the activations instead of the weights (scale the
    inputs by the styles, share one conv, scale the outputs by the demodulation factors): the same
    result as a grouped conv with per-sample weights, without building N weight tensors."""
    k = weight.shape[-1]
    x = x * styles.to(x.dtype)[:, :, None, None]
    if up:
        # Stride-2 transposed conv (2H+1) then a pad-1 FIR of gain 4 -> 2H, the filter centred.
        x = F.conv_transpose2d(x, weight.transpose(0, 1).to(x.dtype), stride=2)
        x = blur(x, fir, pad=1, gain=4.0)
    else:
        x = F.conv2d(x, weight.to(x.dtype), padding=k // 2)
    if demodulate:
        x = x * demodulation(weight, styles).to(x.dtype)[:, :, None, None]
    return x


def demodulation(weight: Tensor, styles: Tensor) -> Tensor:
    """(N, out) fp32: 1/sqrt of the L2 norm of each output channel's modulated weights. Autocast
    is switched off around it: under autocast a matmul runs in bf16/fp16 whatever its inputs'
    dtype, and the sum of squares must not lose precision or overflow."""
    kind = weight.device.type
    off = (torch.autocast(device_type=kind, enabled=False) if torch.amp.is_autocast_available(kind)
           else contextlib.nullcontext())   # the meta device has no autocast to switch off
    with off:
        w2 = weight.float().square().sum(dim=[2, 3])                      # (out, in)
        return (styles.float().square() @ w2.t() + 1e-8).rsqrt()


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv (+ optional 2x upsampling), per-pixel noise, bias, lrelu, clamp."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, *, up: bool = False,
                 kernel_size: int = 3, conv_clamp: float | None = None):
        super().__init__()
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)   # styles start at 1: plain conv
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        # Shape (1,), not a scalar: DeepSpeed broadcasts parameters as bytes, which a 0-d tensor cannot be viewed as.
        self.noise_strength = nn.Parameter(torch.zeros(1))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))
        self.register_buffer("fir", fir_kernel(), persistent=False)
        self.up, self.resolution, self.conv_clamp = up, resolution, conv_clamp

    def forward(self, x: Tensor, w: Tensor, noise_mode: str = "random", gain: float = 1.0) -> Tensor:
        styles = self.affine(w)
        x = modulated_conv2d(x, self.weight, styles, demodulate=True, up=self.up, fir=self.fir)
        if noise_mode == "random":
            noise = torch.randn(x.shape[0], 1, self.resolution, self.resolution, device=x.device, dtype=x.dtype)
            x = x + noise * self.noise_strength.to(x.dtype)
        elif noise_mode == "const":
            x = x + (self.noise_const * self.noise_strength).to(x.dtype)
        return bias_act(x, self.bias, True, self.conv_clamp, gain)


class ToRGB(nn.Module):
    """1x1 modulated conv without demodulation (absolute colour scale must stay learnable)."""

    def __init__(self, in_channels: int, img_channels: int, w_dim: int, conv_clamp: float | None = None):
        super().__init__()
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(img_channels, in_channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(img_channels))
        self.weight_gain = 1.0 / math.sqrt(in_channels)
        self.conv_clamp = conv_clamp

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False)
        return bias_act(x, self.bias, False, self.conv_clamp)


class SynthesisBlock(nn.Module):
    """One resolution: (const | up-conv), conv, and toRGB where the layout needs one."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, img_channels: int, *,
                 is_last: bool, architecture: str, conv_clamp: float | None):
        super().__init__()
        self.architecture, self.resolution = architecture, resolution
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn(out_channels, resolution, resolution))
            self.conv0 = None
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=True, conv_clamp=conv_clamp)
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution, conv_clamp=conv_clamp)
        needs_rgb = is_last or architecture == "skip"
        self.torgb = ToRGB(out_channels, img_channels, w_dim, conv_clamp) if needs_rgb else None
        self.skip = (EqualConv2d(in_channels, out_channels, 1, bias=False, activation=False, up=True)
                     if in_channels and architecture == "resnet" else None)
        self.num_conv = 1 if self.conv0 is None else 2
        self.register_buffer("fir", fir_kernel(), persistent=False)

    def forward(self, x: Tensor | None, img: Tensor | None, ws: Tensor, noise_mode: str):
        """ws: (N, num_conv + 1, w_dim); the last one feeds toRGB (and the next block's first conv)."""
        wi = iter(ws.unbind(1))
        if self.conv0 is None:
            x = self.const.unsqueeze(0).expand(ws.shape[0], -1, -1, -1)
            x = self.conv1(x, next(wi), noise_mode)
        elif self.skip is not None:
            # Residual: both branches scaled by sqrt(1/2) so the sum keeps unit variance.
            y = self.skip(x, gain=SQRT_HALF)
            x = self.conv0(x, next(wi), noise_mode)
            x = y + self.conv1(x, next(wi), noise_mode, gain=SQRT_HALF)
        else:
            x = self.conv0(x, next(wi), noise_mode)
            x = self.conv1(x, next(wi), noise_mode)
        if self.torgb is not None:
            y = self.torgb(x, next(wi))
            img = y if img is None else upsample2d(img, self.fir).to(y.dtype) + y
        return x, img


class SynthesisNetwork(nn.Module):
    def __init__(self, w_dim: int, resolution: int, channels: int, channel_base: int = 32768,
                 channel_max: int = 512, architecture: str = "skip", conv_clamp: float | None = 256):
        super().__init__()
        if architecture not in ("skip", "resnet"):
            raise ValueError(f"architecture must be 'skip' or 'resnet', got {architecture!r}")
        log2 = check_resolution(resolution)
        self.w_dim, self.resolution, self.img_channels = w_dim, resolution, channels
        resolutions = [2 ** i for i in range(2, log2 + 1)]
        blocks, c_in = [], 0
        for r in resolutions:
            c_out = channels_at(r, channel_base, channel_max)
            blocks.append(SynthesisBlock(c_in, c_out, w_dim, r, channels, is_last=r == resolution,
                                         architecture=architecture, conv_clamp=conv_clamp))
            c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        self.num_ws = sum(b.num_conv for b in blocks) + 1
        assert self.num_ws == 2 * log2 - 2

    def forward(self, ws: Tensor, noise_mode: str = "random") -> Tensor:
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        if ws.dim() != 3 or ws.shape[1] != self.num_ws:
            raise ValueError(f"ws must be (N, {self.num_ws}, {self.w_dim}), got {tuple(ws.shape)}")
        x = img = None
        i = 0
        for block in self.blocks:
            x, img = block(x, img, ws[:, i:i + block.num_conv + 1], noise_mode)
            i += block.num_conv
        return img


class StyleGAN2Generator(nn.Module):
    def __init__(self, z_dim: int = 512, w_dim: int = 512, *, resolution: int, channels: int,
                 channel_base: int = 32768, channel_max: int = 512, mapping_layers: int = 8,
                 architecture: str = "skip", conv_clamp: float | None = 256):
        super().__init__()
        self.z_dim, self.w_dim = z_dim, w_dim
        self.synthesis = SynthesisNetwork(w_dim, resolution, channels, channel_base, channel_max,
                                          architecture, conv_clamp)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim, w_dim, self.num_ws, layers=mapping_layers)

    def forward(self, z: Tensor, psi: float = 1.0, noise_mode: str = "random", update_w_avg: bool = False) -> Tensor:
        return self.synthesis(self.mapping(z, psi=psi, update_w_avg=update_w_avg), noise_mode=noise_mode)


# ---- discriminator -------------------------------------------------------------------------------
def largest_divisor_at_most(n: int, k: int) -> int:
    for g in range(min(k, n), 0, -1):
        if n % g == 0:
            return g
    return 1


def minibatch_std(x: Tensor, group: int, num_channels: int = 1) -> Tensor:
    """Appends the std over groups of samples (averaged over features and pixels) as extra channels,
    letting D see variety within a batch. Groups take samples i, i + N/G, ... ."""
    n, c, h, w = x.shape
    g = largest_divisor_at_most(n, group)
    f = num_channels
    y = x.float().reshape(g, n // g, f, c // f, h, w)
    y = (y - y.mean(dim=0)).square().mean(dim=0)             # variance over the group
    y = (y + 1e-8).sqrt().mean(dim=[2, 3, 4])                # (N/G, F)
    y = y.reshape(-1, f, 1, 1).repeat(g, 1, h, w)            # row j -> sample j mod N/G, matching the groups
    return torch.cat([x, y.to(x.dtype)], dim=1)


class DiscriminatorBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, img_channels: int, *, first: bool, architecture: str,
                 conv_clamp: float | None):
        super().__init__()
        self.fromrgb = EqualConv2d(img_channels, in_channels, 1, conv_clamp=conv_clamp) if first else None
        self.conv0 = EqualConv2d(in_channels, in_channels, 3, conv_clamp=conv_clamp)
        self.conv1 = EqualConv2d(in_channels, out_channels, 3, down=True, conv_clamp=conv_clamp)
        self.skip = (EqualConv2d(in_channels, out_channels, 1, bias=False, activation=False, down=True)
                     if architecture == "resnet" else None)

    def forward(self, x: Tensor) -> Tensor:
        if self.fromrgb is not None:
            x = self.fromrgb(x)
        if self.skip is None:
            return self.conv1(self.conv0(x))
        y = self.skip(x, gain=SQRT_HALF)
        return y + self.conv1(self.conv0(x), gain=SQRT_HALF)


class StyleGAN2Discriminator(nn.Module):
    """Image (N, C, R, R) -> logits (N, 1)."""

    def __init__(self, *, resolution: int, channels: int, channel_base: int = 32768, channel_max: int = 512,
                 mbstd_group: int = 4, mbstd_channels: int = 1, architecture: str = "resnet",
                 conv_clamp: float | None = 256):
        super().__init__()
        if architecture not in ("resnet", "orig"):
            raise ValueError(f"architecture must be 'resnet' or 'orig', got {architecture!r}")
        log2 = check_resolution(resolution)
        self.resolution, self.img_channels = resolution, channels
        self.mbstd_group, self.mbstd_channels = mbstd_group, mbstd_channels
        ch = lambda r: channels_at(r, channel_base, channel_max)  # noqa: E731
        self.blocks = nn.ModuleList(
            DiscriminatorBlock(ch(2 ** i), ch(2 ** (i - 1)), channels, first=i == log2, architecture=architecture,
                               conv_clamp=conv_clamp)
            for i in range(log2, 2, -1))
        c4 = ch(4)
        if c4 % mbstd_channels:
            raise ValueError(f"mbstd_channels {mbstd_channels} must divide the 4x4 width {c4}")
        self.conv = EqualConv2d(c4 + mbstd_channels, c4, 3, conv_clamp=conv_clamp)
        self.fc = EqualLinear(c4 * 16, c4, activation=True)
        self.out = EqualLinear(c4, 1)

    def forward(self, img: Tensor) -> Tensor:
        x = img
        for block in self.blocks:
            x = block(x)
        if self.mbstd_group > 0 and self.mbstd_channels > 0:
            x = minibatch_std(x, self.mbstd_group, self.mbstd_channels)
        x = self.conv(x)
        return self.out(self.fc(x.flatten(1)))
