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

import contextlib
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
    """p lives on the device (the buffer `p`): the controller steps it there and the gates compare
    against it, so neither reads a value back to the host. The host keeps a mirror of p (`_p`) only to
    skip the pipeline while p is 0; on a GPU it is refreshed from a non-blocking copy once that copy
    has landed (a step or so late, which only delays the skip), on the CPU at once."""

    def __init__(self, channels: int, *, target: float = 0.6, interval: int = 4, speed_kimg: float = 500,
                 p: float = 0.0):
        super().__init__()
        self.channels, self.target, self.interval, self.speed_kimg = channels, target, interval, speed_kimg
        self.register_buffer("p", torch.tensor(float(p)))
        self._p = float(p)   # the host mirror; see the class docstring
        self._p_copy: tuple[Tensor, torch.cuda.Event] | None = None   # (pinned host copy, its event)
        # sum of sign(D(real)) and count since the last take_stats(); not part of a checkpoint.
        self.register_buffer("stats", torch.zeros(2), persistent=False)

    # ---- p control ---------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, real_logits: Tensor) -> None:
        if self.stats.device != real_logits.device:
            self.stats = self.stats.to(real_logits.device)
        s = real_logits.detach().float().sign()
        self.stats[0] += s.sum()
        self.stats[1] += s.numel()   # a Python number: no tensor made on the host

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

    @torch.no_grad()
    def adjust_from_stats(self, stats: Tensor, images: int) -> Tensor:
        """`adjust` on the device from tensor([sum_sign, count]) (`take_stats`, summed or averaged
        over ranks): no host sync. Returns p (a 0-dim tensor); p stays where it is when count is 0."""
        if self.p.device != stats.device:
            self.p = self.p.to(stats.device)
        total, count = stats[0].float(), stats[1].float()
        step = (total / count.clamp(min=1e-30) - self.target).sign()   # 0 when exactly on target
        moved = (self.p + step * (images / (self.speed_kimg * 1000))).clamp(0.0, 1.0)
        self.p.copy_(torch.where(count > 0, moved, self.p))
        self._refresh_host_p()
        return self.p.clone()

    def _refresh_host_p(self) -> None:
        if self.p.device.type == "meta":
            return
        if self.p.device.type != "cuda":
            self._p = float(self.p)   # on the CPU a read costs nothing
            return
        host = torch.empty((), dtype=self.p.dtype, pin_memory=True)
        host.copy_(self.p, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._p_copy = (host, event)

    def _host_p(self) -> float:
        """The host mirror of p, updated from a finished copy (never waits for one)."""
        if self._p_copy is not None and self._p_copy[1].query():
            self._p = float(self._p_copy[0])
            self._p_copy = None
        return self._p

    def set_p(self, value: float) -> None:
        self.p.fill_(value)
        self._p = float(value)
        self._p_copy = None

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._p = float(self.p)
        self._p_copy = None

    # ---- augmentation ------------------------------------------------------------------------
    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if self._host_p() <= 0:
            return images
        if self.p.device != images.device:
            self.p = self.p.to(images.device)
        p = self.p   # the gates compare against the device value: no host read
        kind = images.device.type
        fp32 = (torch.autocast(device_type=kind, enabled=False) if torch.amp.is_autocast_available(kind)
                else contextlib.nullcontext())   # the meta device has no autocast to switch off
        with fp32:
            x = images.float()
            x = self._warp(x, self._geometric(x, p, generator))
            x = self._colour(x, p, generator)
        return x.to(images.dtype)

    def _geometric(self, x: Tensor, p: Tensor, gen: torch.Generator | None) -> Tensor:
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
        # cos and sin of k·90° exactly, in integer arithmetic: (1, 0, -1, 0) and (0, 1, 0, -1) for k = 0..3
        cos_k = ((1 - k) * (k % 2 == 0)).float()
        sin_k = ((2 - k) * (k % 2 == 1)).float()
        m = m @ _rotate2d(cos_k, sin_k)
        g = gate(p)
        tx = torch.where(g, torch.round((rand() * 2 - 1) * 0.125 * w) * 2 / w, zero)
        ty = torch.where(g, torch.round((rand() * 2 - 1) * 0.125 * h) * 2 / h, zero)
        m = m @ _translate2d(tx, ty)
        # geometric: isotropic scale, rotation, anisotropic scale, rotation, fractional translation.
        s = torch.where(gate(p), torch.exp2(randn() * 0.2), one)
        m = m @ _scale2d(s, s)
        p_rot = 1 - (1 - p).clamp(min=0.0).sqrt()   # two rotations: P(at least one) = p
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

    def _colour(self, x: Tensor, p: Tensor, gen: torch.Generator | None) -> Tensor:
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
            # [v]x = r·[[0, -1, 1], [1, 0, -1], [-1, 1, 0]]: +r below the diagonal cyclically, -r above
            cross = r * (eye_c.roll(-1, dims=1) - eye_c.roll(1, dims=1))
            cos, sin = theta.cos()[:, None, None], theta.sin()[:, None, None]
            a = cos * eye_c + sin * cross + (1 - cos) * vv       # hue: rotation about the luma axis
            lin, off = a @ lin, (a @ off[:, :, None])[:, :, 0]
            s = torch.where(gate(), torch.exp2(randn() * 1.0), one)
            a = vv + (eye_c - vv) * s[:, None, None]             # saturation: scale off the luma axis
            lin, off = a @ lin, (a @ off[:, :, None])[:, :, 0]
        return torch.einsum("nij,njhw->nihw", lin, x) + off[:, :, None, None]
