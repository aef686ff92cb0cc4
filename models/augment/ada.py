"""Adaptive discriminator augmentation (Karras et al., "Training Generative Adversarial Networks
with Limited Data", 2020), the "bgc" pipeline: blit, geometric and colour transforms, each applied
to each sample with probability p, with p steered by how often D calls the reals real.

Geometric transforms (blit included) are composed into one 3x3 matrix per sample and applied by a
single bilinear warp with reflection padding; colour transforms into one (C+1)x(C+1) matrix. Every
distribution is symmetric, so the matrix can be used directly as the output->input sampling map.
Images are expected zero-centred ([-1, 1]): contrast, luma flip and hue act about 0.
The pipeline is differentiable in the images (it also runs on generated images in G's step).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _eye(n: int, k: int, device) -> Tensor:
    return torch.eye(k, device=device).repeat(n, 1, 1)


def _scale2d(sx: Tensor, sy: Tensor) -> Tensor:
    m = _eye(len(sx), 3, sx.device)
    m[:, 0, 0], m[:, 1, 1] = sx, sy
    return m


def _translate2d(tx: Tensor, ty: Tensor) -> Tensor:
    m = _eye(len(tx), 3, tx.device)
    m[:, 0, 2], m[:, 1, 2] = tx, ty
    return m


def _rotate2d(cos: Tensor, sin: Tensor) -> Tensor:
    m = _eye(len(cos), 3, cos.device)
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = cos, -sin, sin, cos
    return m


class AdaptiveAugment(nn.Module):
    def __init__(self, channels: int, *, target: float = 0.6, interval: int = 4, speed_kimg: float = 500,
                 p: float = 0.0):
        super().__init__()
        self.channels, self.target, self.interval, self.speed_kimg = channels, target, interval, speed_kimg
        self.register_buffer("p", torch.tensor(float(p)))
        self._p = float(p)   # a host copy: reading the buffer each forward would sync the GPU
        # sum of sign(D(real)) and count since the last take_stats(); not part of a checkpoint.
        self.register_buffer("stats", torch.zeros(2), persistent=False)

    # ---- p control ---------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, real_logits: Tensor) -> None:
        if self.stats.device != real_logits.device:
            self.stats = self.stats.to(real_logits.device)
        s = real_logits.detach().float().sign()
        self.stats += torch.stack([s.sum(), s.new_tensor(float(s.numel()))])

    @torch.no_grad()
    def take_stats(self) -> Tensor:
        """tensor([sum_sign, count]) since the last call, then reset (sum it over ranks if needed)."""
        out = self.stats.clone()
        self.stats.zero_()
        return out

    @torch.no_grad()
    def adjust(self, sign_mean: float, images: int) -> float:
        """One step of the controller: p moves by images / (speed_kimg * 1000) towards more
        augmentation when D is too sure of the reals (sign_mean > target), less otherwise."""
        step = math.copysign(1.0, sign_mean - self.target) if sign_mean != self.target else 0.0
        new_p = min(max(self._p + step * images / (self.speed_kimg * 1000), 0.0), 1.0)
        self.set_p(new_p)
        return new_p

    def set_p(self, value: float) -> None:
        self.p.fill_(value)
        self._p = float(value)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._p = float(self.p)

    # ---- augmentation ------------------------------------------------------------------------
    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        p = self._p
        if p <= 0:
            return images
        with torch.autocast(device_type=images.device.type, enabled=False):
            x = images.float()
            x = self._warp(x, self._geometric(x, p, generator))
            x = self._colour(x, p, generator)
        return x.to(images.dtype)

    def _geometric(self, x: Tensor, p: float, gen: torch.Generator | None) -> Tensor:
        n, _, h, w = x.shape
        dev = x.device
        rand = lambda: torch.rand(n, device=dev, generator=gen)  # noqa: E731
        randn = lambda: torch.randn(n, device=dev, generator=gen)  # noqa: E731
        gate = lambda q: rand() < q  # noqa: E731
        one, zero = torch.ones(n, device=dev), torch.zeros(n, device=dev)
        # Coordinates are grid_sample's: the image spans [-1, 1], so a shift of t image widths is 2t.
        # blit: x-flip, 90-degree rotations, integer translation
        flip = torch.where(gate(p), (rand() < 0.5).float(), zero)
        m = _scale2d(1 - 2 * flip, one)
        k = torch.where(gate(p), torch.randint(0, 4, (n,), device=dev, generator=gen),
                        torch.zeros(n, dtype=torch.long, device=dev))
        cos_k = torch.tensor([1.0, 0.0, -1.0, 0.0], device=dev)[k]   # exact for multiples of 90 degrees
        sin_k = torch.tensor([0.0, 1.0, 0.0, -1.0], device=dev)[k]
        m = m @ _rotate2d(cos_k, sin_k)
        g = gate(p)
        tx = torch.where(g, torch.round((rand() * 2 - 1) * 0.125 * w) * 2 / w, zero)
        ty = torch.where(g, torch.round((rand() * 2 - 1) * 0.125 * h) * 2 / h, zero)
        m = m @ _translate2d(tx, ty)
        # geometric: isotropic scale, rotation, anisotropic scale, rotation, fractional translation.
        s = torch.where(gate(p), torch.exp2(randn() * 0.2), one)
        m = m @ _scale2d(s, s)
        p_rot = 1 - math.sqrt(max(1 - p, 0.0))   # two rotations: P(at least one) = p
        theta = torch.where(gate(p_rot), (rand() * 2 - 1) * math.pi, zero)
        m = m @ _rotate2d(theta.cos(), theta.sin())
        s = torch.where(gate(p), torch.exp2(randn() * 0.2), one)
        m = m @ _scale2d(s, 1 / s)
        theta = torch.where(gate(p_rot), (rand() * 2 - 1) * math.pi, zero)
        m = m @ _rotate2d(theta.cos(), theta.sin())
        g = gate(p)
        tx, ty = torch.where(g, randn() * 0.125 * 2, zero), torch.where(g, randn() * 0.125 * 2, zero)
        return m @ _translate2d(tx, ty)

    @staticmethod
    def _warp(x: Tensor, m: Tensor) -> Tensor:
        grid = F.affine_grid(m[:, :2, :], list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def _colour(self, x: Tensor, p: float, gen: torch.Generator | None) -> Tensor:
        n, c = x.shape[:2]
        dev = x.device
        rand = lambda: torch.rand(n, device=dev, generator=gen)  # noqa: E731
        randn = lambda: torch.randn(n, device=dev, generator=gen)  # noqa: E731
        gate = lambda: rand() < p  # noqa: E731
        zero, one = torch.zeros(n, device=dev), torch.ones(n, device=dev)
        eye_c = torch.eye(c, device=dev)
        v = torch.full((c,), 1 / math.sqrt(c), device=dev)      # the luma axis
        vv = torch.outer(v, v)
        lin = eye_c.repeat(n, 1, 1)                              # (N, C, C) linear part
        off = torch.zeros(n, c, device=dev)                      # (N, C) offset
        # y = A x + b, composed in the order listed; each new op (A', b') gives A'A, A'b + b'.
        b = torch.where(gate(), randn() * 0.2, zero)
        off = off + b[:, None]                                   # brightness
        ct = torch.where(gate(), torch.exp2(randn() * 0.5), one)
        lin, off = lin * ct[:, None, None], off * ct[:, None]    # contrast
        i = torch.where(gate(), (rand() < 0.5).float(), zero)
        a = eye_c - 2 * vv * i[:, None, None]                    # luma flip (grey: invert)
        lin, off = a @ lin, (a @ off[:, :, None])[:, :, 0]
        if c == 3:
            theta = torch.where(gate(), (rand() * 2 - 1) * math.pi, zero)
            r = 1 / math.sqrt(3)
            cross = torch.tensor([[0.0, -r, r], [r, 0.0, -r], [-r, r, 0.0]], device=dev)   # [v]x
            cos, sin = theta.cos()[:, None, None], theta.sin()[:, None, None]
            a = cos * eye_c + sin * cross + (1 - cos) * vv       # hue: rotation about the luma axis
            lin, off = a @ lin, (a @ off[:, :, None])[:, :, 0]
            s = torch.where(gate(), torch.exp2(randn() * 1.0), one)
            a = vv + (eye_c - vv) * s[:, None, None]             # saturation: scale off the luma axis
            lin, off = a @ lin, (a @ off[:, :, None])[:, :, 0]
        return torch.einsum("nij,njhw->nihw", lin, x) + off[:, :, None, None]
