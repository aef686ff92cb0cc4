"""Raw shard samples -> arrays: `image.png` / `image.npy` (and cond, mask), `cls`, `json`.

A shard's bytes are not trusted: each image part's header (PNG: PIL's lazy open; npy: its
array header) is compared with the shape the set's card promises, or with the pixel cap when
no shape is given, before its pixels are decoded or allocated. Refusals are `CorruptSample`s
naming the sample and part (and the shard, when the raw sample carries `__url__`).
"""
from __future__ import annotations

import io
import json

import numpy as np

from .errors import UserError
from .image_header import UnreadableImage, check_pixels, open_lazily, pil_header

IMAGE_KEYS = ("image", "cond", "mask")
OTHER_KEYS = ("cls", "json")
KEYS = IMAGE_KEYS + OTHER_KEYS
_PNG_BANDS = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}
_GRAY_MODES = ("1", "I", "I;16", "I;16B", "I;16L", "F")  # what decode_png turns into one band


class CorruptSample(UserError):
    """A sample whose parts are missing or don't decode to what the card promises (a UserError:
    where it reaches the CLI, e.g. `models generate` from a damaged input set, it is one line)."""


def check_keys(keys) -> tuple[str, ...]:
    keys = tuple(keys)
    bad = [k for k in keys if k not in KEYS]
    if bad or not keys:
        raise ValueError(f"keys {keys}: each must be one of {KEYS}")
    return keys


def _refuse_shape(name: str, found: tuple, shape: tuple | None) -> None:
    if shape is not None and tuple(found) != tuple(shape):
        raise CorruptSample(f"{name} is {found} (from its header, not decoded), the set promises {tuple(shape)}")


def decode_png(data: bytes, name: str = "PNG", shape: tuple | None = None) -> np.ndarray:
    """PNG -> (H, W, C) uint8 keeping the band count (gray stays 1 band, RGBA 4). The header is
    checked first: against `shape` (H, W, C) when given, else against the pixel cap."""
    try:
        img = open_lazily(data, name)
        header = pil_header(img)
        bands = _PNG_BANDS.get(img.mode, 1 if img.mode in _GRAY_MODES else 3)
        _refuse_shape(name, (header.height, header.width, bands), shape)
        check_pixels(header, name)
        img.load()
    except (CorruptSample, UnreadableImage) as exc:
        raise CorruptSample(str(exc)) from None
    except Exception as exc:  # pixels that do not decode: truncated, bad CRC, bad zlib stream
        raise CorruptSample(f"{name}: does not decode: {type(exc).__name__}: {exc}") from None
    if img.mode not in _PNG_BANDS:  # not written by orbitgen: palette, 16-bit, ...
        img = img.convert("L" if img.mode in _GRAY_MODES else "RGB")
    a = np.asarray(img, dtype=np.uint8)
    return a[:, :, None] if a.ndim == 2 else a


def decode_npy(data: bytes, name: str = "npy", shape: tuple | None = None) -> np.ndarray:
    """.npy -> (H, W, C) uint8; its header's dtype and shape are checked (against `shape` when
    given, and against the bytes that follow) before the array is allocated."""
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        found, fortran, dtype = read_header(f)
    except Exception as exc:  # not an npy file, or a header that does not parse
        raise CorruptSample(f"{name}: not an npy array: {type(exc).__name__}: {exc}") from None
    if dtype != np.uint8 or len(found) != 3:
        raise CorruptSample(f"{name}: npy holds {dtype} {found}, not (H, W, C) uint8")
    _refuse_shape(name, found, shape)
    if len(data) - f.tell() != int(np.prod(found, dtype=np.int64)):
        raise CorruptSample(f"{name}: npy header says {found}, but {len(data) - f.tell()} bytes of data follow")
    a = np.frombuffer(data, np.uint8, offset=f.tell()).reshape(found, order="F" if fortran else "C")
    return a.copy(order="C")  # writable and C-ordered, as np.load gave


def decode_sample(raw: dict, keys: tuple[str, ...], shapes: dict[str, tuple] | None = None) -> dict:
    """`{"__key__", key: value for key in keys}`; raises CorruptSample when a part is missing,
    broken, or (given `shapes`, e.g. {"image": (64, 64, 3)}) of another shape."""
    if "__missing__" in raw:
        raise CorruptSample(raw["__missing__"])
    key = raw["__key__"]
    where = (f"{raw['__url__']}: " if "__url__" in raw else "") + f"sample {key!r}"
    out = {"__key__": key}
    for k in keys:
        shape = shapes.get(k) if shapes else None
        if k in IMAGE_KEYS:
            if f"{k}.png" in raw:
                a = decode_png(raw[f"{k}.png"], f"{where} part {k}.png", shape)
            elif f"{k}.npy" in raw:
                a = decode_npy(raw[f"{k}.npy"], f"{where} part {k}.npy", shape)
            else:
                raise CorruptSample(f"{where}: no {k}.png or {k}.npy (parts: "
                                    f"{sorted(p for p in raw if not p.startswith('__'))})")
            if shape is not None and a.shape != shape:
                raise CorruptSample(f"{where}: {k} is {a.shape}, the set promises {shape}")
            out[k] = a
        else:
            part = "cls" if k == "cls" else "json"
            if part not in raw:
                raise CorruptSample(f"{where}: no {part} part")
            try:
                out[k] = int(raw["cls"]) if k == "cls" else json.loads(raw["json"])
            except (ValueError, UnicodeDecodeError) as exc:
                raise CorruptSample(f"{where} part {part}: {type(exc).__name__}: {exc}") from None
    return out


def expected_shapes(resolution: int, channels: int) -> dict[str, tuple]:
    return {"image": (resolution, resolution, channels), "cond": (resolution, resolution, channels),
            "mask": (resolution, resolution, 1)}
