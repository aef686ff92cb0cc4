"""Sources: what a shard set is built from. A source is an iterator of `Sample`s."""
from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .storage import filesystem

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass
class Sample:
    """One training example. `image` is what is generated; the optional parts serve the
    conditional families (`cond` the input image, `mask` a segmentation mask, `cls` a label).
    `meta` is stored as the sample's `json`."""

    key: str
    image: np.ndarray  # (H, W, C) uint8
    meta: dict = field(default_factory=dict)
    cond: np.ndarray | None = None
    mask: np.ndarray | None = None
    cls: int | None = None


def key_from_path(rel: str) -> str:
    """`a/b/img.01.png` -> `a_b_img_01`. webdataset splits a file name at its FIRST dot, so a
    key must not contain one; slashes are flattened so keys stay file names."""
    return re.sub(r"[/.\\]", "_", rel.rsplit(".", 1)[0])


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and float images (common in planetary TIFFs) scaled to 8 bits instead of clipped."""
    if img.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(img, dtype=np.float32) / 257.0 + 0.5).astype(np.uint8))
    if img.mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        return Image.fromarray(((a - lo) / max(hi - lo, 1e-12) * 255.0 + 0.5).astype(np.uint8))
    return img


def to_mode(img: Image.Image, channels: int | None) -> Image.Image:
    """8-bit gray ("L") or RGB. channels None keeps gray gray and colour colour (alpha dropped)."""
    img = _to_8bit(img)
    if channels is None:
        channels = 1 if img.mode in ("1", "L", "LA") else 3
    return img.convert("L" if channels == 1 else "RGB")


def to_array(img: Image.Image) -> np.ndarray:
    a = np.asarray(img, dtype=np.uint8)
    return a[:, :, None] if a.ndim == 2 else a


def fit(img: Image.Image, resolution: int) -> Image.Image:
    """Shorter side to `resolution`, centre crop (crop first, then one Lanczos resize)."""
    return ImageOps.fit(img, (resolution, resolution), method=Image.Resampling.LANCZOS)


def read_folder(root: str, resolution: int, channels: int | None) -> Iterator[Sample]:
    """Every image under `root` (a path or fsspec URL, any depth, sorted by relative path)."""
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, not {channels}")
    fs, base = filesystem(root)
    base = base.rstrip("/")
    if not fs.isdir(base):
        raise FileNotFoundError(f"{root}: no such folder")
    files = sorted(p for p in fs.find(base) if p.lower().endswith(IMAGE_EXTENSIONS))
    seen: dict[str, str] = {}
    for path in files:
        rel = path[len(base) + 1:]
        key = key_from_path(rel)
        if key in seen:
            raise ValueError(f"{rel} and {seen[key]} both map to sample key {key!r}")
        seen[key] = rel
        try:
            with fs.open(path, "rb") as f:
                img = Image.open(io.BytesIO(f.read()))
                img.load()
            img = fit(to_mode(ImageOps.exif_transpose(img), channels), resolution)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ValueError(f"cannot read image {root.rstrip('/')}/{rel}: {exc}") from exc
        yield Sample(key=key, image=to_array(img), meta={"source": rel})
