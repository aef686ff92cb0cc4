"""PNG bytes <-> uint8 images: how conditional registered models take their inputs.

Depends on Pillow only, so a served model (which ships `models/`) can decode its inputs.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import Tensor

MODES = {1: "L", 3: "RGB"}


def encode_png(image: np.ndarray) -> bytes:
    """(H, W, 1|3) uint8 -> PNG bytes (lossless)."""
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] not in MODES:
        raise ValueError(f"need an (H, W, 1|3) uint8 array, got {a.shape} {a.dtype}")
    buf = io.BytesIO()
    Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a, MODES[a.shape[2]]).save(buf, format="PNG")
    return buf.getvalue()


def decode_pngs(items, *, channels: int, size: int, what: str) -> Tensor:
    """PNG byte strings -> uint8 (N, channels, size, size); grey and colour are converted to
    `channels` (1 or 3); any other size is an error naming `what` (the input column)."""
    if channels not in MODES:
        raise ValueError(f"{what}: PNG inputs carry 1 or 3 channels; this model takes {channels}")
    out = []
    for i, data in enumerate(items):
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"{what}[{i}]: expected PNG bytes, got {type(data).__name__}")
        img = Image.open(io.BytesIO(data)).convert(MODES[channels])
        if img.size != (size, size):
            raise ValueError(f"{what}[{i}]: the model takes {size}x{size} images, got {img.size[0]}x{img.size[1]}")
        a = np.asarray(img, dtype=np.uint8)
        out.append(a[:, :, None] if a.ndim == 2 else a)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()
