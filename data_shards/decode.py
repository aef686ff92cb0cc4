"""Raw shard samples -> arrays: the image (`png`, `jpg`, `jpeg`, `webp`, `tif`, `npy`, or orbitgen's
older `image.png` / `image.npy`), `cond.*`, `mask.*`, `cls`, `json` (member_names.py `part_names`).

A shard's bytes are not trusted: each image part's header (PIL's lazy open; npy: its array
header) is compared with the shape the set's card promises, or with the pixel cap when no shape
is given, before its pixels are decoded or allocated. A card that says `resize` (an adopted set
whose images have other sizes, data.resize: resize) compares the bands only; the pixel cap still
holds, and the decoded image is centre-cropped and resized to the card's resolution. Refusals are `CorruptSample`s
naming the sample and part (and the shard, when the raw sample carries `__url__`).
"""
from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from .errors import UserError
from .image_header import UnreadableImage, check_pixels, open_lazily, pil_header
from .member_names import find_part, image_extension_of, part_names
from .pixels import fit

IMAGE_KEYS = ("image", "cond", "mask")
OTHER_KEYS = ("cls", "json")
KEYS = IMAGE_KEYS + OTHER_KEYS
_PNG_BANDS = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}
_GRAY_MODES = ("1", "I", "I;16", "I;16B", "I;16L", "F")  # what decode_pil turns into one band
_LANCZOS, _NEAREST = Image.Resampling.LANCZOS, Image.Resampling.NEAREST


class CorruptSample(UserError):
    """A sample whose parts are missing or don't decode to what the card promises (a UserError:
    where it reaches the CLI, e.g. `models generate` from a damaged input set, it is one line)."""


def check_keys(keys) -> tuple[str, ...]:
    keys = tuple(keys)
    bad = [k for k in keys if k not in KEYS]
    if bad or not keys:
        raise ValueError(f"keys {keys}: each must be one of {KEYS}")
    return keys


def _refuse_shape(name: str, found: tuple, shape: tuple | None, bands_only: bool = False) -> None:
    if shape is None:
        return
    if bands_only and found[2:] != tuple(shape)[2:]:
        raise CorruptSample(f"{name} has {found[2]} band(s) (from its header, not decoded), the set promises {shape[2]}")
    if not bands_only and tuple(found) != tuple(shape):
        raise CorruptSample(f"{name} is {found} (from its header, not decoded), the set promises {tuple(shape)}")


def decoded_bands(mode: str) -> int:
    """The bands a PIL image of `mode` decodes to here: gray stays 1, LA 2, RGBA 4, the rest RGB."""
    return _PNG_BANDS.get(mode, 1 if mode in _GRAY_MODES else 3)


def header_shape(part: str, data: bytes, name: str) -> tuple[int, int, int]:
    """(H, W, bands) of an image part from its header alone (`part`: its member name, e.g. `jpg`)."""
    if image_extension_of(part) == "npy":
        return tuple(int(n) for n in _npy_header(data, name)[0])
    try:
        img = open_lazily(data, name)
        header = pil_header(img)
    except UnreadableImage as exc:
        raise CorruptSample(str(exc)) from None
    return header.height, header.width, decoded_bands(img.mode)


def decode_pil(data: bytes, name: str = "image", shape: tuple | None = None, bands_only: bool = False) -> np.ndarray:
    """PNG, JPEG, WebP, TIFF -> (H, W, C) uint8 keeping the band count (gray stays 1 band, RGBA
    4). The header is checked first: against `shape` (H, W, C) when given (`bands_only`: its
    bands), and always against the pixel cap."""
    try:
        img = open_lazily(data, name)
        header = pil_header(img)
        bands = decoded_bands(img.mode)
        _refuse_shape(name, (header.height, header.width, bands), shape, bands_only)
        check_pixels(header, name)
        img.load()
    except (CorruptSample, UnreadableImage) as exc:
        raise CorruptSample(str(exc)) from None
    except Exception as exc:  # pixels that do not decode: truncated, bad CRC, bad zlib stream
        raise CorruptSample(f"{name}: does not decode: {type(exc).__name__}: {exc}") from None
    if img.mode not in _PNG_BANDS:  # not written by orbitgen: palette, 16-bit, CMYK JPEG, ...
        img = img.convert("L" if img.mode in _GRAY_MODES else "RGB")
    a = np.asarray(img, dtype=np.uint8)
    return a[:, :, None] if a.ndim == 2 else a


decode_png = decode_pil   # the name callers used when every image part was a PNG


def _npy_header(data: bytes, name: str) -> tuple[tuple, bool, int]:
    """(shape, fortran order, offset of the data) of an (H, W, C) uint8 .npy, from its header."""
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        found, fortran, dtype = read_header(f)
    except Exception as exc:  # not an npy file, or a header that does not parse
        raise CorruptSample(f"{name}: not an npy array: {type(exc).__name__}: {exc}") from None
    if dtype != np.uint8 or len(found) != 3:
        raise CorruptSample(f"{name}: npy holds {dtype} {found}, not (H, W, C) uint8")
    return found, fortran, f.tell()


def decode_npy(data: bytes, name: str = "npy", shape: tuple | None = None, bands_only: bool = False) -> np.ndarray:
    """.npy -> (H, W, C) uint8; its header's dtype and shape are checked (against `shape` when
    given, `bands_only`: its bands, and against the bytes that follow) before the array is allocated."""
    found, fortran, offset = _npy_header(data, name)
    _refuse_shape(name, found, shape, bands_only)
    if len(data) - offset != int(np.prod(found, dtype=np.int64)):
        raise CorruptSample(f"{name}: npy header says {found}, but {len(data) - offset} bytes of data follow")
    a = np.frombuffer(data, np.uint8, offset=offset).reshape(found, order="F" if fortran else "C")
    return a.copy(order="C")  # writable and C-ordered, as np.load gave


def decode_image(part: str, data: bytes, name: str, shape: tuple | None = None, resize: bool = False) -> np.ndarray:
    """An image part (`part`: its member name) -> (H, W, C) uint8. With `resize`, an image of
    another size (same bands) is centre-cropped and resized to `shape` (masks: nearest)."""
    decode = decode_npy if image_extension_of(part) == "npy" else decode_pil
    a = decode(data, name, shape, bands_only=resize and shape is not None)
    if resize and shape is not None and a.shape != tuple(shape):
        a = fit(a, shape[0], _NEAREST if part.startswith("mask.") else _LANCZOS)
    return a


def decode_sample(raw: dict, keys: tuple[str, ...], shapes: dict[str, tuple] | None = None,
                  resize: bool = False) -> dict:
    """`{"__key__", key: value for key in keys}`; raises CorruptSample when a part is missing,
    broken, or (given `shapes`, e.g. {"image": (64, 64, 3)}) of another shape; `resize`: images of
    another size are fitted to `shapes` instead (other bands are still refused)."""
    if "__missing__" in raw:
        raise CorruptSample(raw["__missing__"])
    key = raw["__key__"]
    where = (f"{raw['__url__']}: " if "__url__" in raw else "") + f"sample {key!r}"
    out = {"__key__": key}
    for k in keys:
        shape = shapes.get(k) if shapes else None
        if k in IMAGE_KEYS:
            part = find_part(raw, k)
            if part is None:
                raise CorruptSample(f"{where}: no {k} part (looked for {', '.join(part_names(k)[:3])}, ...; parts: "
                                    f"{sorted(p for p in raw if not p.startswith('__'))})")
            a = decode_image(part, raw[part], f"{where} part {part}", shape, resize)
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
