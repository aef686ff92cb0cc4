"""PNG bytes <-> uint8 images: how conditional registered models take their inputs.

Depends on Pillow only, so a served model (which ships `models/`) can decode its inputs.

A served model's input comes from whoever calls it, and a few hundred bytes of PNG can declare
13,000 x 13,000 pixels (a gigabyte decoded). So each input's size is read from its header (PIL
opens lazily) and compared with the model's resolution and a pixel cap before any pixel is
decoded. The cap is $ORBITGEN_MAX_IMAGE_PIXELS (default 100 M), the variable the data plane
uses; it is read here, not imported: `models/` imports nothing of ours.
"""
from __future__ import annotations

import io
import os
import warnings

import numpy as np
import torch
from PIL import Image
from torch import Tensor

MODES = {1: "L", 3: "RGB"}
MAX_PIXELS_ENV, DEFAULT_MAX_PIXELS = "ORBITGEN_MAX_IMAGE_PIXELS", 100_000_000


def max_pixels() -> int:
    """The most pixels (width x height) one input image may declare."""
    value = os.environ.get(MAX_PIXELS_ENV, "")
    try:
        return int(value) if value.strip() else DEFAULT_MAX_PIXELS
    except ValueError:
        raise ValueError(f"${MAX_PIXELS_ENV}={value!r}: must be a whole number") from None


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
    `channels` (1 or 3). Anything but PNG bytes, and any other size (read from the header,
    before decoding), is an error naming `what` (the input column) and the item's index."""
    if channels not in MODES:
        raise ValueError(f"{what}: PNG inputs carry 1 or 3 channels; this model takes {channels}")
    cap = max_pixels()
    out = []
    for i, data in enumerate(items):
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"{what}[{i}]: expected PNG bytes, got {type(data).__name__}")
        img = _open_png(bytes(data), f"{what}[{i}]")
        width, height = img.size                   # from the header: nothing decoded yet
        if (width, height) != (size, size):
            raise ValueError(f"{what}[{i}]: the model takes {size}x{size} images, got {width}x{height} "
                             "(refused before decoding)")
        if width * height > cap:
            raise ValueError(f"{what}[{i}]: {width}x{height} pixels, more than the {cap:,} allowed "
                             f"(refused before decoding; ${MAX_PIXELS_ENV} raises the cap)")
        try:
            img = img.convert(MODES[channels])
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds on a damaged stream
            raise ValueError(f"{what}[{i}]: a PNG whose pixels cannot be decoded: {type(e).__name__}: {e}") from None
        a = np.asarray(img, dtype=np.uint8)
        out.append(a[:, :, None] if a.ndim == 2 else a)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def _open_png(data: bytes, name: str) -> Image.Image:
    """The PNG's header parsed, its pixels not decoded. PIL's own bomb check is left to ours
    (its warning silenced, its error, for sizes twice its limit, reported as ours)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=["PNG"])
    except Image.DecompressionBombError as e:
        raise ValueError(f"{name}: {e} (refused before decoding)") from None
    except Exception as e:  # noqa: BLE001 - not a PNG, or a header PIL cannot parse
        why = "" if "_io.BytesIO" in str(e) else f": {e}"
        raise ValueError(f"{name}: not a PNG image{why}") from None
