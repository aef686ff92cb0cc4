"""Looking at a shard set: its card and manifest as text, and a grid of its first images."""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from .errors import UserError
from .card import read_card, read_manifest
from .storage import filesystem


def image_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile (N, H, W, C) uint8 images, `nrow` per row (default: a square), black padding."""
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"need (N, H, W, C) uint8 images, got {images.shape} {images.dtype}")
    n, h, w, c = images.shape
    ncol = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / ncol))
    grid = np.zeros((rows * (h + pad) + pad, ncol * (w + pad) + pad, c), np.uint8)
    for i, img in enumerate(images):
        y, x = pad + (i // ncol) * (h + pad), pad + (i % ncol) * (w + pad)
        grid[y:y + h, x:x + w] = img
    return grid


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def describe(url: str, max_rows: int = 20) -> str:
    """The card, a samples-per-shard table (head and tail when long) and the total size."""
    card, manifest = read_card(url), read_manifest(url)
    lines = [f"shard set {url}"]
    lines += [f"  {k:<12} {v}" for k, v in card.model_dump().items()]
    lines.append("")
    lines.append(f"  {'shard':<24} {'samples':>8} {'bytes':>10}  sha256")
    rows = list(manifest.itertuples(index=False))
    shown = rows if len(rows) <= max_rows else rows[: max_rows - 5] + [None] + rows[-5:]
    for r in shown:
        if r is None:
            lines.append(f"  ... {len(rows) - max_rows + 1} more shards ...")
            continue
        name = r.url.rsplit("/", 1)[-1]
        lines.append(f"  {name:<24} {r.samples:>8} {_size(r.bytes):>10}  {r.sha256[:16]}")
    lines.append("")
    lines.append(f"  total: {int(manifest.samples.sum())} samples in {len(rows)} shards, "
                 f"{_size(int(manifest.bytes.sum()))}")
    return "\n".join(lines)


def _display(a: np.ndarray, bands: int) -> np.ndarray:
    """(N, H, W, C) -> (N, H, W, bands) for a grid: a 1-band mask next to RGB images becomes
    gray RGB, and images beyond 3 bands show their first three (2-band: the first)."""
    c = a.shape[3]
    if c >= 3:
        a = a[..., :3]
    elif c == 2:
        a = a[..., :1]
    return np.repeat(a, bands, axis=3) if a.shape[3] == 1 and bands == 3 else a


def save_preview(url: str, out_png: str, n: int = 16) -> str:
    """Decode the first `n` samples (manifest order) and write them as one PNG grid: a square of
    images, or for paired sets one row a sample (cond, mask, image side by side)."""
    from .decode import IMAGE_KEYS
    from .stream import iterate_once  # torch is only needed here, not for describe()

    card = read_card(url)
    keys = tuple(k for k in ("cond", "mask", "image") if k in card.modalities and k in IMAGE_KEYS)
    batches = list(iterate_once(url, batch_size=n, limit=n, keys=keys))
    if not batches:
        raise UserError(f"{url}: no readable samples")
    parts = {k: np.concatenate([b[k].permute(0, 2, 3, 1).numpy() for b in batches]) for k in keys}
    bands = 1 if card.channels == 1 else 3
    shown = [_display(parts[k], bands) for k in keys]
    if len(shown) == 1:
        grid = image_grid(shown[0])
    else:  # interleave: sample 0's parts, sample 1's parts, ...
        grid = image_grid(np.stack(shown, axis=1).reshape(-1, *shown[0].shape[1:]), nrow=len(shown))
    img = Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    fs, path = filesystem(out_png)
    with fs.open(path, "wb") as f:
        f.write(buf.getvalue())
    return out_png
