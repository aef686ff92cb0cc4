"""Raw shard samples -> arrays: `image.png` / `image.npy` (and cond, mask), `cls`, `json`."""
from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

IMAGE_KEYS = ("image", "cond", "mask")
OTHER_KEYS = ("cls", "json")
KEYS = IMAGE_KEYS + OTHER_KEYS
_PNG_BANDS = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}


class CorruptSample(ValueError):
    """A sample whose parts are missing or don't decode to what the card promises."""


def check_keys(keys) -> tuple[str, ...]:
    keys = tuple(keys)
    bad = [k for k in keys if k not in KEYS]
    if bad or not keys:
        raise ValueError(f"keys {keys}: each must be one of {KEYS}")
    return keys


def decode_png(data: bytes) -> np.ndarray:
    """PNG -> (H, W, C) uint8 keeping the band count (gray stays 1 band, RGBA 4)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    if img.mode not in _PNG_BANDS:  # not written by orbitgen: palette, 16-bit, ...
        img = img.convert("L" if img.mode in ("1", "I", "I;16", "F") else "RGB")
    a = np.asarray(img, dtype=np.uint8)
    return a[:, :, None] if a.ndim == 2 else a


def decode_npy(data: bytes) -> np.ndarray:
    a = np.load(io.BytesIO(data), allow_pickle=False)
    if a.dtype != np.uint8 or a.ndim != 3:
        raise CorruptSample(f"npy holds {a.dtype} {a.shape}, not (H, W, C) uint8")
    return a


def decode_sample(raw: dict, keys: tuple[str, ...], shapes: dict[str, tuple] | None = None) -> dict:
    """`{"__key__", key: value for key in keys}`; raises CorruptSample (or a decoder's error) when
    a part is missing, broken, or (given `shapes`, e.g. {"image": (64, 64, 3)}) of another shape."""
    if "__missing__" in raw:
        raise CorruptSample(raw["__missing__"])
    out = {"__key__": raw["__key__"]}
    for k in keys:
        if k in IMAGE_KEYS:
            if f"{k}.png" in raw:
                a = decode_png(raw[f"{k}.png"])
            elif f"{k}.npy" in raw:
                a = decode_npy(raw[f"{k}.npy"])
            else:
                raise CorruptSample(f"no {k}.png or {k}.npy (parts: {sorted(p for p in raw if not p.startswith('__'))})")
            if shapes and k in shapes and a.shape != shapes[k]:
                raise CorruptSample(f"{k} is {a.shape}, the set promises {shapes[k]}")
            out[k] = a
        elif k == "cls":
            out[k] = int(raw["cls"])
        else:
            out[k] = json.loads(raw["json"])
    return out


def expected_shapes(resolution: int, channels: int) -> dict[str, tuple]:
    return {"image": (resolution, resolution, channels), "cond": (resolution, resolution, channels),
            "mask": (resolution, resolution, 1)}
