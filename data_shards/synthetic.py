"""Procedural crater fields: a built-in data set that looks like comet/asteroid probe images.

A height field (fractal value noise plus parabolic crater bowls with raised rims, radii
power-law distributed) is lit by a low sun from one side: bowls turn dark, rims facing the
sun bright. Image i's parameters come from its own RNG seeded with (seed, i), drawn in
resolution-independent units, so the same scene renders at any resolution. A `CraterStyle`
sets the crater population and the sun: `FIELD`, the probe-image look (dozens of craters from a
pixel up, each image its own sun), or `LARGE`, a few big bowls under one sun, which a small GAN
learns to draw in a CPU minute (the quickstart's set). Heavy work is
batched over a chunk of images, using only +, -, *, / and sqrt on large arrays (exactly
rounded in IEEE arithmetic): an image's bytes don't depend on the chunk it was rendered in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .sources import Sample

CHUNK_PIXELS = 1 << 18  # pixels rendered together: enough to amortise numpy calls, cache-sized
MAX_CRATERS = 64      # crater candidates drawn per image
OCTAVES = (4, 8, 16, 32, 64)  # value-noise grid sizes, in cells across the image
RIM_WIDTH = 0.35      # rim half-width, in crater radii


def _sun(azimuth: float, elevation: float) -> tuple[float, float, float]:
    # Scalar math here: vectorised cos/sin may round differently by position in an array.
    c = math.cos(elevation)
    return c * math.cos(azimuth), c * math.sin(azimuth), math.sin(elevation)


@dataclass(frozen=True)
class CraterStyle:
    name: str                            # in each sample's metadata (but FIELD's, which predates styles)
    craters: tuple[int, int]             # craters per image, inclusive range (at most MAX_CRATERS)
    radii: tuple[float, float]           # smallest and largest radius, fraction of the width
    slope: float                         # differential power law of the radii, p(r) ~ r^-slope
    sun: tuple[float, float] | None      # (azimuth, elevation) in degrees; None: each image its own


FIELD = CraterStyle(name="field", craters=(32, MAX_CRATERS), radii=(0.006, 0.25), slope=2.4, sun=None)
LARGE = CraterStyle(name="large", craters=(3, 10), radii=(0.05, 0.3), slope=2.0, sun=(135.0, 30.0))


def _params(seed: int, i: int, style: CraterStyle = FIELD) -> dict:
    # The draws keep their order whatever the style: FIELD's images stay byte for byte the same.
    rng = np.random.default_rng([seed, i])
    n = int(rng.integers(style.craters[0], style.craters[1] + 1))
    a, (rmin, rmax) = style.slope, style.radii
    u = rng.random(MAX_CRATERS)
    r = (rmin ** (1 - a) + u * (rmax ** (1 - a) - rmin ** (1 - a))) ** (1 / (1 - a))
    params = {
        "grids": [rng.random((g + 1, g + 1), dtype=np.float32) for g in OCTAVES],
        "roughness": rng.uniform(0.35, 0.55),
        "relief": rng.uniform(0.015, 0.04),          # terrain height, fraction of width
        "albedo": rng.random((5, 5), dtype=np.float32),
        "centres": rng.uniform(-0.05, 1.05, (MAX_CRATERS, 2)),
        "radii": np.where(np.arange(MAX_CRATERS) < n, r, 0.0),
        "depth": rng.uniform(0.25, 0.45, MAX_CRATERS),  # bowl depth / radius
        "rim": rng.uniform(0.06, 0.14, MAX_CRATERS),    # rim height / radius
        "sun": _sun(rng.uniform(0, 2 * math.pi), math.radians(rng.uniform(18, 40))),
        "tint": np.array([1.0, rng.uniform(0.90, 0.96), rng.uniform(0.78, 0.88)], np.float32),
    }
    if style.sun is not None:
        params["sun"] = _sun(math.radians(style.sun[0]), math.radians(style.sun[1]))
    return params


def value_noise(grids: np.ndarray, res: int) -> np.ndarray:
    """(B, g+1, g+1) lattice values -> (B, res, res), smoothstep-interpolated value noise."""
    g = grids.shape[1] - 1
    u = (np.arange(res, dtype=np.float32) + np.float32(0.5)) * np.float32(g / res)
    i0 = np.minimum(u.astype(np.int64), g - 1)
    t = u - i0
    w = t * t * (3 - 2 * t)
    rows = grids[:, i0, :] * (1 - w)[None, :, None] + grids[:, i0 + 1, :] * w[None, :, None]
    return rows[:, :, i0] * (1 - w)[None, None, :] + rows[:, :, i0 + 1] * w[None, None, :]


def _craters(ps: list[dict], res: int) -> tuple[np.ndarray, np.ndarray]:
    """Crater heights (pixels) and bowl darkness, summed sparsely over each crater's box."""
    b = np.repeat(np.arange(len(ps)), MAX_CRATERS)
    c = np.concatenate([p["centres"] for p in ps]).astype(np.float32) * res
    r = np.concatenate([p["radii"] for p in ps]).astype(np.float32) * res
    depth = np.concatenate([p["depth"] for p in ps]).astype(np.float32) * r
    rim = np.concatenate([p["rim"] for p in ps]).astype(np.float32) * r
    keep = r >= 0.75  # sub-pixel craters don't show at this resolution
    b, c, r, depth, rim = b[keep], c[keep], r[keep], depth[keep], rim[keep]
    half = np.ceil(r * (1 + RIM_WIDTH)).astype(np.int64)
    side = 2 * half + 1
    x0 = np.floor(c[:, 0]).astype(np.int64) - half
    y0 = np.floor(c[:, 1]).astype(np.int64) - half
    # One entry per (crater, pixel of its box), crater after crater.
    n = side * side
    k = np.repeat(np.arange(len(r)), n)
    j = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    y = y0[k] + j // side[k]
    x = x0[k] + j % side[k]
    inside = (x >= 0) & (x < res) & (y >= 0) & (y < res)
    k, x, y = k[inside], x[inside], y[inside]
    dx = x.astype(np.float32) + np.float32(0.5) - c[k, 0]
    dy = y.astype(np.float32) + np.float32(0.5) - c[k, 1]
    rho2 = (dx * dx + dy * dy) / (r[k] * r[k])
    bowl = np.maximum(0, 1 - rho2)
    bump = np.maximum(0, 1 - ((np.sqrt(rho2) - 1) / np.float32(RIM_WIDTH)) ** 2) ** 2
    flat = (b[k] * res + y) * res + x
    size = len(ps) * res * res
    height = np.bincount(flat, weights=rim[k] * bump - depth[k] * bowl, minlength=size)
    dark = np.bincount(flat, weights=bowl, minlength=size)
    shape = (len(ps), res, res)
    return height.reshape(shape).astype(np.float32), dark.reshape(shape).astype(np.float32)


def _render(ps: list[dict], res: int, channels: int) -> np.ndarray:
    h = np.zeros((len(ps), res, res), np.float32)
    for o, g in enumerate(OCTAVES):
        if g > res // 2:
            break
        amp = np.array([p["roughness"] ** o for p in ps], np.float32)[:, None, None]
        h += amp * value_noise(np.stack([p["grids"][o] for p in ps]), res)
    relief = np.array([p["relief"] for p in ps], np.float32)[:, None, None] * res
    crater_h, dark = _craters(ps, res)
    h = h * relief + crater_h

    # Lambert shading under a low sun, scaled so that flat ground is mid-gray.
    gy, gx = np.gradient(h, axis=(1, 2))
    lx, ly, lz = np.array([p["sun"] for p in ps], np.float32).T[:, :, None, None]
    lambert = np.maximum(0, lz - gx * lx - gy * ly) / np.sqrt(gx * gx + gy * gy + 1)
    albedo = 0.85 + 0.3 * value_noise(np.stack([p["albedo"] for p in ps]), res) - 0.35 * dark
    img = np.float32(0.04) + np.float32(0.5) * albedo * lambert / lz
    if channels == 3:
        img = img[..., None] * np.stack([p["tint"] for p in ps])[:, None, None, :]
    else:
        img = img[..., None]
    return (np.clip(img, 0, 1) * 255 + np.float32(0.5)).astype(np.uint8)


def crater_field(count: int, resolution: int, channels: int = 1, seed: int = 0,
                 style: CraterStyle = FIELD) -> Iterator[Sample]:
    """`count` crater-field images (H, W, C) uint8, keys `crater-000000`, ...; deterministic."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels}")
    if resolution < 8 or count < 0 or seed < 0:
        raise ValueError("need resolution >= 8, count >= 0, seed >= 0")
    chunk = max(1, CHUNK_PIXELS // (resolution * resolution))
    for start in range(0, count, chunk):
        idx = range(start, min(count, start + chunk))
        images = _render([_params(seed, i, style) for i in idx], resolution, channels)
        for i, image in zip(idx, images):
            meta = {"generator": "crater_field", "seed": seed, "index": i}
            if style != FIELD:
                meta["style"] = style.name
            yield Sample(key=f"crater-{i:06d}", image=np.ascontiguousarray(image), meta=meta)
