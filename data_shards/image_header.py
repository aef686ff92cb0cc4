"""What an image file says about itself (width, height, bands) before any pixel is decoded.

A 170 KB PNG can declare 13,000 x 13,000 pixels and take a gigabyte to decode, so every image
orbitgen reads (source files at `data build`, PNG parts of shards) is first opened lazily — PIL
parses the header only, tifffile the IFDs only — and its size is compared with what the caller
accepts: the set's card for shards, a pixel cap for sources. Only then are pixels decoded.

Caps, overridable per environment for machines with more (or less) memory:
    ORBITGEN_MAX_IMAGE_PIXELS   width x height of one source image or shard part (100 M)
    ORBITGEN_MAX_RASTER_BYTES   decoded bytes of one GeoTIFF raster, read whole (4 GiB)

Every refusal is an `UnreadableImage` naming the file or sample part it was given, never the
in-memory buffer it was read from.
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass

from PIL import Image

from .errors import UserError

DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
DEFAULT_MAX_RASTER_BYTES = 4 << 30
TIFF_EXTENSIONS = (".tif", ".tiff")


class UnreadableImage(UserError):
    """An image that is not one, whose header does not parse, or that is larger than allowed."""


class EmptyImage(UnreadableImage):
    """A header that parses but declares no pixels or zero bands."""


class UnsupportedLayout(UnreadableImage):
    """A TIFF whose bands are laid out in a way orbitgen cannot turn into one (H, W, C) image."""


@dataclass(frozen=True)
class ImageHeader:
    width: int
    height: int
    bands: int
    itemsize: int  # bytes per band value: 1 for 8-bit, 2 for 16-bit, 4 for float32 ...
    mode: str      # PIL's mode, or the TIFF's dtype

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def decoded_bytes(self) -> int:
        return self.pixels * self.bands * self.itemsize


def _cap(variable: str, default: int) -> int:
    value = os.environ.get(variable, "")
    try:
        return int(value) if value.strip() else default
    except ValueError:
        raise UserError(f"${variable}={value!r}: must be a whole number") from None


def max_image_pixels() -> int:
    return _cap("ORBITGEN_MAX_IMAGE_PIXELS", DEFAULT_MAX_IMAGE_PIXELS)


def max_raster_bytes() -> int:
    return _cap("ORBITGEN_MAX_RASTER_BYTES", DEFAULT_MAX_RASTER_BYTES)


def _why(exc: Exception) -> str:
    """An exception's text without the `<_io.BytesIO object at 0x...>` libraries put in it."""
    text = str(exc)
    if "_io.BytesIO" in text or not text:
        return type(exc).__name__
    return f"{type(exc).__name__}: {text}"


def open_lazily(data: bytes, name: str) -> Image.Image:
    """A PIL image whose header is parsed and whose pixels are not decoded yet."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own cap decides
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise UnreadableImage(f"{name}: {exc}") from None
    except Exception as exc:  # PIL raises many kinds on hostile headers
        raise UnreadableImage(f"{name}: not an image that can be read (PNG, JPEG, TIFF, BMP, WebP): "
                              f"{_why(exc)}") from None


def pil_header(img: Image.Image) -> ImageHeader:
    bands = len(img.getbands())
    itemsize = {"I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2, "I": 4, "F": 4}.get(img.mode, 1)
    return ImageHeader(img.size[0], img.size[1], bands, itemsize, img.mode)


def tiff_header(data: bytes, name: str) -> ImageHeader:
    """The first series of a TIFF: (width, height, bands) from its IFDs, no strip decoded. Bands
    are what `sources.tiff_array` makes of the series: everything beside rows and columns."""
    import numpy as np
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            series, page = tif.series[0], tif.pages[0]
            shape, axes, dtype = tuple(int(n) for n in series.shape), series.axes, np.dtype(series.dtype)
            height, width, declared = int(page.imagelength), int(page.imagewidth), int(page.samplesperpixel)
    except Exception as exc:  # tifffile raises many kinds on hostile IFDs
        raise UnreadableImage(f"{name}: not a TIFF that can be read: {_why(exc)}") from None
    size = int(np.prod(shape, dtype=np.int64))
    if declared < 1 or size == 0 or height < 1 or width < 1:
        raise EmptyImage(f"{name}: a TIFF with zero bands or no pixels (shape {shape}, axes {axes!r}, "
                              f"SamplesPerPixel {declared}); an image needs at least one band")
    return ImageHeader(width, height, max(1, size // (height * width)), dtype.itemsize, str(dtype))


def max_file_bytes() -> int:
    """The largest image file read into memory: 8 bytes (4 bands of 16 bits) per allowed pixel."""
    return 8 * max_image_pixels()


def check_pixels(header: ImageHeader, name: str, max_pixels: int | None = None) -> None:
    """Refuse an image larger than the pixel cap, or with no pixels at all."""
    limit = max_image_pixels() if max_pixels is None else max_pixels
    if header.width < 1 or header.height < 1 or header.bands < 1:
        raise EmptyImage(f"{name}: {header.width}x{header.height} pixels with {header.bands} bands: "
                              "an image needs at least one of each")
    if header.pixels > limit:
        raise UnreadableImage(f"{name}: {header.width}x{header.height} pixels, more than the {limit:,} allowed "
                              "(not decoded; raise $ORBITGEN_MAX_IMAGE_PIXELS if it is meant to be read)")


def image_header(data: bytes, name: str) -> ImageHeader:
    """The header of an image file of any supported format; UnreadableImage if it has none."""
    if name.lower().endswith(TIFF_EXTENSIONS):
        return tiff_header(data, name)
    return pil_header(open_lazily(data, name))
