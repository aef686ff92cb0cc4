"""The DDPM noise-prediction UNet (Ho et al. 2020): x_t, t -> ε̂.

A sinusoidal embedding of t goes through a two-layer MLP (width 4·base_channels) into every
residual block (GroupNorm, SiLU, 3x3 conv, + the time embedding, GroupNorm, SiLU, dropout, 3x3
conv, residual). Levels run at resolution / 2**i with `base_channels · channel_mult[i]` channels,
`num_res_blocks` blocks each, single-head self-attention after the blocks of the levels whose
feature-map size is in `attention_resolutions`, and a stride-2 conv between levels; the middle is
block, attention, block; the decoder mirrors the encoder with one block more per level, each
taking one skip tensor, and nearest-neighbour 2x upsampling followed by a conv. As in DDPM, the
last conv of every block, the attention output and the output conv start at zero.

The encoder half (time embedding, input conv, down path, middle) is its own module, `UNetEncoder`,
so a ControlNet (models/nets/controlnet.py) can deep-copy it; `DDPMUNet.forward` takes residuals to add to
every skip tensor and to the middle output (`control_residuals`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def norm(channels: int) -> nn.GroupNorm:
    # DDPM's 32 groups; narrower (test-sized) networks get the largest group count that divides.
    return nn.GroupNorm(math.gcd(32, channels), channels)


def zero_(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """(N,) timesteps -> (N, dim) sinusoids, as in the Transformer and DDPM."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device, dtype=torch.float32) / max(half - 1, 1))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class TimeEmbedding(nn.Module):
    def __init__(self, base_channels: int):
        super().__init__()
        self.dim = base_channels
        self.mlp = nn.Sequential(nn.Linear(base_channels, 4 * base_channels), nn.SiLU(),
                                 nn.Linear(4 * base_channels, 4 * base_channels))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.dim))


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float):
        super().__init__()
        self.in_layers = nn.Sequential(norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, c_out))
        self.out_layers = nn.Sequential(norm(c_out), nn.SiLU(), nn.Dropout(dropout),
                                        zero_(nn.Conv2d(c_out, c_out, 3, padding=1)))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x) + self.emb(emb)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class SelfAttention(nn.Module):
    """Single-head self-attention over all positions of the feature map, residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_(nn.Conv2d(channels, channels, 1))

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v as (n, 1, hw, c), each with unit stride in its last dimension, as the fused
        attention kernels (flash, memory-efficient) need: positions-major, channels innermost. From
        a channels_last feature map this is a view; from NCHW one copy."""
        n, c, h, w = x.shape
        y = self.qkv(self.norm(x)).permute(0, 2, 3, 1).contiguous().reshape(n, 1, h * w, 3, c)
        return y[..., 0, :], y[..., 1, :], y[..., 2, :]

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        out = F.scaled_dot_product_attention(*self.qkv_heads(x))             # (n, 1, hw, c)
        return x + self.proj(out.reshape(n, h, w, c).permute(0, 3, 1, 2))


class Block(nn.Module):
    """A residual block, then attention when the level has it."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float, attention: bool):
        super().__init__()
        self.res = ResBlock(c_in, c_out, emb_dim, dropout)
        self.attn = SelfAttention(c_out) if attention else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.attn(self.res(x, emb))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Middle(nn.Module):
    def __init__(self, channels: int, emb_dim: int, dropout: float):
        super().__init__()
        self.res1 = ResBlock(channels, channels, emb_dim, dropout)
        self.attn = SelfAttention(channels)
        self.res2 = ResBlock(channels, channels, emb_dim, dropout)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.res2(self.attn(self.res1(x, emb)), emb)


def check_layout(resolution: int, channel_mult: list[int], attention_resolutions: list[int]) -> None:
    """Rejects a resolution the levels cannot halve and attention sizes that never occur."""
    levels = len(channel_mult)
    if levels < 1 or resolution % 2 ** (levels - 1):
        raise ValueError(f"data.resolution ({resolution}) must be divisible by 2**(len(model.channel_mult) - 1) "
                         f"= {2 ** (levels - 1)}")
    sizes = [resolution // 2**i for i in range(levels)]
    missing = [s for s in attention_resolutions if s not in sizes]
    if missing:
        raise ValueError(f"model.attention_resolutions {missing} are not feature-map sizes of this UNet; "
                         f"at data.resolution {resolution} they are {sizes}")


class UNetEncoder(nn.Module):
    """Time embedding, input conv, down path, middle: x, t -> (skip tensors, middle output, embedding).

    `hint`, when given, is added to the input conv's output (a ControlNet's condition features).
    """

    def __init__(self, *, in_channels: int, resolution: int, base_channels: int, channel_mult: list[int],
                 num_res_blocks: int, attention_resolutions: list[int], dropout: float):
        super().__init__()
        check_layout(resolution, channel_mult, attention_resolutions)
        emb_dim = 4 * base_channels
        self.time_embed = TimeEmbedding(base_channels)
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        self.skip_channels = [base_channels]   # one per skip tensor, in the order they are made
        ch, size = base_channels, resolution
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(Block(ch, base_channels * mult, emb_dim, dropout, size in attention_resolutions))
                ch = base_channels * mult
                self.skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(Downsample(ch))
                self.skip_channels.append(ch)
                size //= 2
        self.mid = Middle(ch, emb_dim, dropout)
        self.mid_channels = ch

    def forward(self, x: Tensor, t: Tensor, hint: Tensor | None = None) -> tuple[list[Tensor], Tensor, Tensor]:
        emb = self.time_embed(t)
        h = self.conv_in(x)
        if hint is not None:
            h = h + hint
        skips = [h]
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
        return skips, self.mid(h, emb), emb


class UNetDecoder(nn.Module):
    def __init__(self, *, out_channels: int, resolution: int, base_channels: int, channel_mult: list[int],
                 num_res_blocks: int, attention_resolutions: list[int], dropout: float, skip_channels: list[int]):
        super().__init__()
        emb_dim = 4 * base_channels
        skips = list(skip_channels)
        ch = base_channels * channel_mult[-1]
        size = resolution // 2 ** (len(channel_mult) - 1)
        self.up = nn.ModuleList()
        for level in reversed(range(len(channel_mult))):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                c_out = base_channels * channel_mult[level]
                blocks.append(Block(ch + skips.pop(), c_out, emb_dim, dropout, size in attention_resolutions))
                ch = c_out
            self.up.append(nn.ModuleDict({"blocks": blocks, "upsample": Upsample(ch) if level else nn.Identity()}))
            size *= 2
        self.out = nn.Sequential(norm(ch), nn.SiLU(), zero_(nn.Conv2d(ch, out_channels, 3, padding=1)))

    def forward(self, skips: list[Tensor], h: Tensor, emb: Tensor) -> Tensor:
        skips = list(skips)
        for level in self.up:
            for block in level["blocks"]:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
            h = level["upsample"](h)
        return self.out(h)


class DDPMUNet(nn.Module):
    def __init__(self, *, in_channels: int, out_channels: int, resolution: int, base_channels: int = 64,
                 channel_mult: list[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attention_resolutions: list[int] = (16,), dropout: float = 0.1):
        super().__init__()
        layout = {"resolution": resolution, "base_channels": base_channels, "channel_mult": list(channel_mult),
                  "num_res_blocks": num_res_blocks, "attention_resolutions": list(attention_resolutions),
                  "dropout": dropout}
        self.encoder = UNetEncoder(in_channels=in_channels, **layout)
        self.decoder = UNetDecoder(out_channels=out_channels, skip_channels=self.encoder.skip_channels, **layout)

    def forward(self, x: Tensor, t: Tensor, control_residuals: list[Tensor] | None = None) -> Tensor:
        """`control_residuals`: one per skip tensor (`encoder.skip_channels`), then one for the middle."""
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        skips, h, emb = self.encoder(x, t)
        if control_residuals is not None:
            if len(control_residuals) != len(skips) + 1:
                raise ValueError(f"expected {len(skips) + 1} control residuals, got {len(control_residuals)}")
            skips = [s + r for s, r in zip(skips, control_residuals)]
            h = h + control_residuals[-1]
        return self.decoder(skips, h, emb)
