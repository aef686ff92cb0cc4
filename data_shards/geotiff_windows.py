"""GeoTIFF scenes of any size cut into tiles by windowed reads through rasterio (`orbitgen[geo]`).

`source_geotiff.read_geotiff` hands a raster here when rasterio can be imported. Nothing reads
the whole raster: each tile is one `src.read(window=...)`, GDAL's block cache is capped
(`GDAL_CACHEMAX`, below), and the per-band scaling comes from the file's statistics, which GDAL
takes from stored statistics, an overview (a COG has them), or a sample of blocks, each read
through the same capped cache. GDAL decodes whole blocks (tiles or strips), so a raster whose
blocks are larger than MAX_BLOCK_BYTES (one strip for the whole scene) is refused, as are TIFFs
whose IFDs (read first with tifffile, by byte ranges) declare zero bands, a stack of images, or
more blocks than they hold. Peak memory therefore depends on the tile size, the block cap and the
cache, not on the scene's size (tests/unit/data/test_geotiff_windowed.py measures a 16384² scene).

Rasters are opened where they are: a local path directly; any other fsspec URL (s3://, gs://, ...)
through `storage.filesystem`'s file objects (rasterio's `opener=`, read-ahead kept to 1 MiB), which
GDAL reads by byte ranges, so a Cloud-Optimised GeoTIFF on S3 is read block by block with the same
endpoint and credentials as the rest of orbitgen (AWS_ENDPOINT_URL, AWS_*).

Nodata: a pixel is nodata when every selected band is masked (the band's nodata value, an internal
mask or alpha band) or any is NaN; an alpha band is not kept as a channel unless `bands` names it.
A tile with a larger nodata fraction than `max_nodata` is dropped and counted in the source's note
("N of M tiles dropped as nodata", as the whole-raster reader does: a Skipped item would stop a
build under the default `--on-error fail`); a kept tile with some nodata is FILLED: its nodata
pixels are 0 in every band, and `nodata_fraction` in its json says how much was filled.

Scaling: 8-bit bands are kept as they are; any other type is stretched per band to 0..255 from
the band's minimum and maximum in the file's statistics (exact for small rasters, GDAL's
approximation for large ones: values outside are clipped), recorded in json as `range`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from .errors import UserError
from .image_header import EmptyImage, UnreadableImage, UnsupportedLayout, max_raster_bytes
from .pixels import apply_channels, to_uint8
from .sources import Sample, Skipped

# GDAL's block cache defaults to 5% of the machine's memory: on a large node that alone could hold
# a whole scene. 64 MB holds a few rows of 512² blocks, enough for overlapping strides.
GDAL_OPTIONS = {
    "GDAL_CACHEMAX": 64,                          # MB
    "GDAL_PAM_ENABLED": "NO",                     # computed statistics are not written as .aux.xml beside sources
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",  # no listing of an S3 prefix for side-car files
}


# GDAL decodes whole blocks (a tile, or a strip of rows): a raster stored as one strip would be read
# whole for its first window. Blocks beyond this (or beyond $ORBITGEN_MAX_RASTER_BYTES, if lower)
# are refused, so the bound holds for untiled files and hostile headers too.
MAX_BLOCK_BYTES = 64 << 20


# Up to this many pixels (a few seconds of decoding at most) the scaling range is exact; above it,
# GDAL's approximate statistics, whose range may be narrower (values outside it are clipped).
EXACT_STATISTICS_PIXELS = 4096 * 4096


class NeedsAffine(UserError):
    """A raster georeferenced in a way that gives no (or no single) affine transform."""


WARP_HINT = ("this layout needs an affine transform (ModelTransformation, or ModelPixelScale with one "
             "ModelTiepoint); warp it first, e.g. gdalwarp -r bilinear IN.tif OUT.tif")


def parse_bands(bands: str | list[int] | tuple[int, ...] | None) -> list[int] | None:
    """`"1,2,3"` or `[1, 2, 3]` -> [1, 2, 3] (1-based, GDAL's numbering); None keeps every band."""
    if bands is None or bands == "":
        return None
    parts = bands.split(",") if isinstance(bands, str) else list(bands)
    try:
        picked = [int(str(p).strip()) for p in parts]
    except ValueError:
        raise UserError(f"bands {bands!r}: band numbers from 1, separated by commas (e.g. 1,2,3)") from None
    if not picked or min(picked) < 1:
        raise UserError(f"bands {bands!r}: band numbers start at 1 (e.g. 1,2,3)")
    return picked


@dataclass(frozen=True)
class Georeference:
    crs: str | None
    transform: list[float] | None  # [a, b, c, d, e, f]: x = a*col + b*row + c, y = d*col + e*row + f


def georeference(src) -> Georeference:
    """The raster's CRS and affine transform as GDAL reads them; none for an ungeoreferenced raster;
    NeedsAffine for one placed only by ground control points."""
    gcps, _ = src.gcps
    if src.transform.is_identity and gcps:
        if len(gcps) == 1:
            raise NeedsAffine(f"one tie point without ModelPixelScale gives no pixel size; {WARP_HINT}")
        raise NeedsAffine(f"georeferenced by {len(gcps)} tie points (ground control points), not an affine "
                          f"transform; {WARP_HINT}")
    if src.transform.is_identity and src.crs is None:
        return Georeference(None, None)  # not georeferenced: tiles carry no coordinates
    t = src.transform
    crs = None
    if src.crs is not None:
        crs = src.crs.to_string() or src.crs.to_wkt()  # "EPSG:32633" when it has a code, else WKT
    return Georeference(crs, [float(v) for v in (t.a, t.b, t.c, t.d, t.e, t.f)])


def band_ranges(src, indexes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-band (min, max) of the valid pixels (each band's nodata excluded) from GDAL's statistics:
    exact up to EXACT_STATISTICS_PIXELS, above that approximated from an overview or a sample of
    blocks. Either way GDAL walks blocks through its capped cache: never a whole-raster read."""
    approx = src.width * src.height > EXACT_STATISTICS_PIXELS
    lo, hi = [], []
    for i in indexes:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rasterio 1.4 deprecates statistics() in favour of stats()
            s = src.stats(indexes=[i], approx=approx)[0] if hasattr(src, "stats") else src.statistics(i, approx=approx)
        lo.append(s.min)
        hi.append(s.max)
    return np.asarray(lo, np.float64), np.asarray(hi, np.float64)


def configure_gdal() -> None:
    """GDAL_OPTIONS as process-wide GDAL settings, set again before each open (cheap, idempotent).
    Not a rasterio.Env: its state is per thread and stacked, and a tile generator is suspended and
    finalised at arbitrary points, which would pop another caller's environment."""
    from rasterio.env import set_gdal_config

    for key, value in GDAL_OPTIONS.items():
        set_gdal_config(key, value)


# Bytes an fsspec file fetches per request beyond what GDAL asks for: s3fs reads ahead 50 MB by
# default, which would make every tile of a COG cost 50 MB of transfer and memory.
REMOTE_BLOCK_BYTES = 1 << 20


class RangeReads:
    """An fsspec filesystem as rasterio's `opener`: files opened with a small read-ahead block."""

    def __init__(self, fs):
        self.fs = fs

    def open(self, path, mode="rb", **kwargs):
        return self.fs.open(path, mode, block_size=REMOTE_BLOCK_BYTES, cache_type="readahead", **kwargs)

    def isfile(self, path):
        return self.fs.isfile(path)

    def isdir(self, path):
        return self.fs.isdir(path)

    def ls(self, path):
        return self.fs.ls(path)

    def modified(self, path):
        return self.fs.modified(path)

    def size(self, path):
        return self.fs.size(path)


def open_raster(fs, path: str):
    """A dataset reading `path` on `fs` by windows: local files by name, others by byte ranges."""
    import rasterio

    configure_gdal()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NotGeoreferencedWarning: georeference() decides
        if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
            return rasterio.open(path)
        return rasterio.open(path, opener=RangeReads(fs))  # GDAL asks for sizes and byte ranges


def check_tiff_layout(fs, path: str, rel: str) -> None:
    """Refuse what GDAL would quietly half-read: a TIFF with zero bands, or a stack of several
    multi-band images (GDAL takes the first). tifffile reads the IFDs only, by byte ranges."""
    import tifffile

    with RangeReads(fs).open(path, "rb") as fh, tifffile.TiffFile(fh) as tif:
        series, page = tif.series[0], tif.pages.first
        shape, axes = tuple(int(n) for n in series.shape), series.axes
        declared = int(page.samplesperpixel)
        if declared < 1 or 0 in shape:
            raise EmptyImage(f"a TIFF with zero bands or no pixels (shape {shape}, axes {axes!r}, SamplesPerPixel "
                             f"{declared}); an image needs at least one band")
        needed, stored = int(np.prod(page.chunked, dtype=np.int64)), len(page.dataoffsets)
    if stored < needed:
        # GDAL would read the missing blocks as empty: a damaged header could declare millions of them.
        raise UnreadableImage(f"its size needs {needed:,} tiles or strips but it holds {stored:,}: truncated or "
                              "damaged")
    if len(shape) > 3 and int(np.prod(shape[:-3])) > 1:
        raise UnsupportedLayout(f"a TIFF of shape {shape} (axes {axes!r}) holds several multi-band images; "
                                "supported: one image with any number of bands (H, W, bands)")


def colour_bands(src) -> list[int]:
    """Every band but an alpha band, which GDAL already applies as the nodata mask of the others."""
    from rasterio.enums import ColorInterp

    kept = [i for i, ci in zip(src.indexes, src.colorinterp) if ci != ColorInterp.alpha]
    return kept or list(src.indexes)


def check_blocks(src, indexes: list[int], dtype: np.dtype) -> None:
    """UnreadableImage when one block of the selected bands decodes to more than the block cap."""
    limit = min(MAX_BLOCK_BYTES, max_raster_bytes())
    rows, cols = max(src.block_shapes[i - 1] for i in indexes)
    # A pixel-interleaved file decodes every band of a block at once, whichever are selected.
    bands = src.count if src.interleaving is not None and src.interleaving.name == "PIXEL" else len(indexes)
    size = int(rows) * int(cols) * bands * dtype.itemsize
    if size > limit:
        raise UnreadableImage(f"stored in blocks of {cols}x{rows} pixels x {bands} bands = {size:,} bytes decoded "
                              f"each, more than the {limit:,} a windowed read decodes at once ({MAX_BLOCK_BYTES >> 20} "
                              "MiB, or $ORBITGEN_MAX_RASTER_BYTES if lower; not read): rewrite it tiled, e.g. "
                              "gdal_translate -co TILED=YES -co COMPRESS=DEFLATE IN.tif OUT.tif")


def raster_problem(exc: Exception, path: str, rel: str) -> str:
    """GDAL's message for a raster, with the full path it repeats shortened to the raster's name."""
    return f"cannot read GeoTIFF: {type(exc).__name__}: {str(exc).removeprefix(f'{rel}: ').replace(path, rel)}"


@dataclass(frozen=True)
class TilePlan:
    """What every tile of one raster shares: placement, the bands read, their type and scaling."""
    geo: Georeference
    indexes: list[int]
    dtype: np.dtype
    lo: np.ndarray | None  # per-band range stretched to 0..255; None for 8-bit bands, kept as they are
    hi: np.ndarray | None


def plan_tiles(src, bands: list[int] | None) -> TilePlan:
    """Check the open raster (UserError with the reason) and work out what its tiles share."""
    geo = georeference(src)
    indexes = bands or colour_bands(src)
    if max(indexes) > src.count:
        raise UserError(f"has {src.count} band{'s' * (src.count != 1)}; bands {indexes} asked for")
    dtypes = {src.dtypes[i - 1] for i in indexes}
    if len(dtypes) != 1:
        raise UserError(f"bands of different types {sorted(dtypes)}; pick bands of one type")
    dtype = np.dtype(dtypes.pop())
    if dtype.kind not in "biuf":
        raise UserError(f"{dtype} values; supported: integers or floats")
    check_blocks(src, indexes, dtype)
    lo, hi = band_ranges(src, indexes) if dtype != np.uint8 else (None, None)
    return TilePlan(geo, indexes, dtype, lo, hi)


def windowed_tiles(fs, path: str, rel: str, stem: str, resolution: int, stride: int, max_nodata: float,
                   policy: str, bands: list[int] | None, counts: dict) -> Iterator[Sample | Skipped]:
    """The tiles of one raster, each read by its own window; problems with the raster as a whole
    are one Skipped(rel). `counts` gathers tiles seen and dropped as nodata for the source's note."""
    from rasterio.windows import Window

    try:
        check_tiff_layout(fs, path, rel)
        src = open_raster(fs, path)
    except UserError as exc:
        yield Skipped(rel, str(exc))
        return
    except Exception as exc:
        yield Skipped(rel, raster_problem(exc, path, rel))
        return
    # Closed in `finally`, not by `with src`: entering a dataset pushes a GDAL environment on this
    # thread's stack, and a generator finalised later (by the garbage collector) would pop whichever
    # environment is on top then, another caller's.
    try:
        try:
            plan = plan_tiles(src, bands)
        except UserError as exc:
            yield Skipped(rel, str(exc))
            return
        except Exception as exc:  # one unreadable raster is that raster's problem
            yield Skipped(rel, raster_problem(exc, path, rel))
            return
        h, w = src.height, src.width
        if h < resolution or w < resolution:
            yield Skipped(rel, f"{h}x{w} pixels: smaller than one {resolution}x{resolution} tile")
            return
        meta = {"source": rel, "crs": plan.geo.crs, "bands": len(plan.indexes), "band_indexes": plan.indexes,
                "dtype": str(plan.dtype), "nodata": src.nodata}
        if plan.lo is not None:
            meta["range"] = [[float(v) for v in plan.lo], [float(v) for v in plan.hi]]  # stretched to 0..255
        for row in range(0, h - resolution + 1, stride):
            for col in range(0, w - resolution + 1, stride):
                counts["tiles"] += 1
                try:
                    block = src.read(plan.indexes, window=Window(col, row, resolution, resolution), masked=True)
                except Exception as exc:  # a corrupt block spoils its tiles, not the rest of the raster
                    yield Skipped(f"{rel}:r{row}c{col}", raster_problem(exc, path, rel))
                    continue
                tile, invalid = filled_tile(block, plan.lo, plan.hi)
                fraction = float(invalid.mean())
                if fraction > max_nodata:
                    counts["dropped"] += 1
                    continue
                yield Sample(key=f"{stem}-r{row:06d}-c{col:06d}",
                             image=np.ascontiguousarray(apply_channels(tile, policy)),
                             meta={**meta, "row": row, "col": col, "nodata_fraction": fraction,
                                   "transform": tile_transform(plan.geo.transform, row, col),
                                   "bounds": tile_bounds(plan.geo.transform, row, col, resolution)})
    finally:
        src.close()


def tile_transform(t: list[float] | None, row: int, col: int) -> list[float] | None:
    """The affine transform of the tile whose top-left pixel is (row, col): the origin moves."""
    if t is None:
        return None
    a, b, c, d, e, f = t
    return [float(v) for v in (a, b, a * col + b * row + c, d, e, d * col + e * row + f)]


def tile_bounds(t: list[float] | None, row: int, col: int, size: int) -> list[float] | None:
    """[left, bottom, right, top] of the size x size tile at (row, col): the extremes of its corners."""
    if t is None:
        return None
    a, b, c, d, e, f = t
    corners = [(col + dc, row + dr) for dr in (0, size) for dc in (0, size)]
    xs = [a * x + b * y + c for x, y in corners]
    ys = [d * x + e * y + f for x, y in corners]
    return [float(min(xs)), float(min(ys)), float(max(xs)), float(max(ys))]


def filled_tile(block: np.ma.MaskedArray, lo, hi) -> tuple[np.ndarray, np.ndarray]:
    """(bands, H, W) masked values -> ((H, W, bands) uint8 with nodata pixels 0, (H, W) nodata)."""
    data = np.moveaxis(np.ma.getdata(block), 0, -1)
    mask = np.moveaxis(np.ma.getmaskarray(block), 0, -1)
    invalid = mask.all(axis=2)
    if data.dtype.kind == "f":
        invalid |= np.isnan(data).any(axis=2)
    tile = to_uint8(data, lo, hi) if lo is not None else data.astype(np.uint8, copy=False)  # our own buffer either way
    tile[invalid] = 0
    return tile, invalid


def rasterio_or_none() -> Callable | None:
    """`windowed_tiles` when the geo extra is installed, else None (the whole-raster reader stays)."""
    try:
        import rasterio  # noqa: F401
    except ImportError:
        return None
    return windowed_tiles
