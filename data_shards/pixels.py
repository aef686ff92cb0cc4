"""Pixel arrays: (H, W, C) uint8 with any band count, the channel policies, centre-crop + resize.

Every source turns what it reads into such an array first, so the policies and the resizing
are the same for PNG/JPEG folders, TIFF stacks and GeoTIFF tiles.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

CHANNEL_POLICIES = ("keep", "gray", "rgb")
PIL_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}  # band counts PIL (and PNG) hold at 8 bits


def channel_policy(value: str | int | None) -> str:
    """`keep|gray|rgb`; the older spellings None, 1 and 3 (and "1", "3") mean keep, gray, rgb."""
    aliases = {None: "keep", 1: "gray", 3: "rgb", "1": "gray", "3": "rgb"}
    policy = aliases.get(value, value)
    if policy not in CHANNEL_POLICIES:
        raise ValueError(f"channels must be one of {', '.join(CHANNEL_POLICIES)} (or 1, 3), not {value!r}")
    return policy


def hwc(a: np.ndarray) -> np.ndarray:
    """(H, W) -> (H, W, 1); (H, W, C) unchanged."""
    a = np.asarray(a)
    if a.ndim == 2:
        return a[:, :, None]
    if a.ndim != 3:
        raise ValueError(f"need an (H, W) or (H, W, C) array, got shape {a.shape}")
    return a


def to_uint8(a: np.ndarray, lo=None, hi=None) -> np.ndarray:
    """Any numeric array to uint8 without clipping: uint8 as is, 16-bit scaled by 1/257, anything
    else stretched from [lo, hi] (default: its own min and max; per band when given per band)."""
    a = np.asarray(a)
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype == np.uint16 and lo is None and hi is None:
        return (a.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    f = a.astype(np.float32)
    lo = np.nanmin(f) if lo is None else np.asarray(lo, np.float32)
    hi = np.nanmax(f) if hi is None else np.asarray(hi, np.float32)
    f = (np.nan_to_num(f, nan=0.0) - lo) / np.maximum(hi - lo, 1e-12)
    return (np.clip(f, 0, 1) * 255.0 + 0.5).astype(np.uint8)


def luma(a: np.ndarray) -> np.ndarray:
    """(H, W, >=3) uint8 -> (H, W, 1) uint8: ITU-R 601 luma of the first three bands, in the same
    integer arithmetic as PIL's "L" conversion (so gray sets match whichever path made them)."""
    r, g, b = (a[:, :, i].astype(np.uint32) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)[:, :, None]


def apply_channels(a: np.ndarray, policy: str) -> np.ndarray:
    """keep: every band; gray: 1 band (luma of the first three, or the first band of 1-2 band
    images); rgb: the first three bands (a 1-2 band image's first band repeated)."""
    a = hwc(a)
    c = a.shape[2]
    if policy == "keep":
        return a
    if policy == "gray":
        return a[:, :, :1] if c < 3 else luma(a)
    if policy == "rgb":
        return np.repeat(a[:, :, :1], 3, axis=2) if c < 3 else a[:, :, :3]
    raise ValueError(f"unknown channel policy {policy!r}")


def from_pil(img: Image.Image) -> np.ndarray:
    """A PIL image -> (H, W, 1|3) uint8: EXIF rotation applied, alpha dropped, 16-bit and float
    data scaled (planetary TIFFs), palettes expanded."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return hwc(to_uint8(np.asarray(img)))
    return hwc(np.asarray(img.convert("L" if img.mode in ("1", "L", "LA", "La") else "RGB"), np.uint8))


def _resize(a: np.ndarray, size: int, resample) -> np.ndarray:
    c = a.shape[2]
    if c in PIL_MODES:
        img = Image.fromarray(a[:, :, 0] if c == 1 else a, PIL_MODES[c])
        return hwc(np.asarray(img.resize((size, size), resample)))
    # More bands than PIL holds: one band at a time (same filter, same result per band).
    return np.stack([np.asarray(Image.fromarray(a[:, :, i], "L").resize((size, size), resample))
                     for i in range(c)], axis=2)


def fit(a: np.ndarray, resolution: int, resample=Image.Resampling.LANCZOS) -> np.ndarray:
    """Centre crop to a square, then one resize to `resolution` (Lanczos; masks pass NEAREST)."""
    a = hwc(a)
    h, w = a.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    a = a[top:top + s, left:left + s]
    if s == resolution:
        return np.ascontiguousarray(a)
    return _resize(np.ascontiguousarray(a), resolution, resample)
