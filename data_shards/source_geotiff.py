"""`geotiff`: GeoTIFF rasters cut into square tiles of the set's resolution.

SOURCE is one GeoTIFF or a folder of them. Tiles start every `stride` pixels (default: the
resolution, i.e. no overlap) and are not resized. Any band count is kept (`--channels keep`),
so multispectral rasters give .npy samples. A pixel is nodata when every band equals the
raster's GDAL_NODATA value (or is NaN); a tile with more than `max_nodata` of them (default:
any) is dropped. Rasters that are not 8-bit are stretched per band from the raster's valid
min to max; `json` records that range, the tile's CRS (`EPSG:n`) and its affine transform
`[a, b, c, d, e, f]` (x = a*col + b*row + c, y = d*col + e*row + f, GDAL's PixelIsArea
convention), so a tile can be put back on the map.

`bands` (e.g. "1,2,3", GDAL's 1-based numbering) keeps those bands in that order; default all.
Each tile's json also holds its `bounds` [left, bottom, right, top] in the CRS's units.

Two readers, chosen by what is installed:
- With the `orbitgen[geo]` extra (rasterio), `geotiff_windows` reads every tile by its own window,
  local files and COGs on S3 alike, with memory bounded whatever the scene's size; see there for
  nodata (filled) and scaling (from the file's statistics).
- Without it, the raster is read whole with tifffile (no GDAL needed): fine for scenes of a few GB
  at most. Its header is checked first: zero bands, or more decoded bytes than
  $ORBITGEN_MAX_RASTER_BYTES (`image_header`, 4 GiB by default), and the raster is refused without
  reading a strip, in one line that names the extra.
Tiles are placed by an affine transform; a raster georeferenced only by tie points (ground control
points) has none, and is refused with that said rather than tiled without coordinates or with
wrong ones.
"""
from __future__ import annotations

import io
from typing import Iterator

import numpy as np

from .errors import InputNotFound, UserError
from .geotiff_windows import WARP_HINT, NeedsAffine, parse_bands, rasterio_or_none, tile_bounds, tile_transform
from .image_header import UnreadableImage, max_raster_bytes, tiff_header
from .pixels import apply_channels, channel_policy, to_uint8
from .sample_keys import key_from_path
from .sources import TIFF_EXTENSIONS, Sample, Skipped, Source, tiff_array
from .storage import filesystem

USER_DEFINED = 32767  # GeoKey value for "not an EPSG code"


def crs_of(geo: dict) -> str | None:
    for key in ("ProjectedCSTypeGeoKey", "GeographicTypeGeoKey"):
        code = geo.get(key)
        if code is not None and int(code) != USER_DEFINED:
            return f"EPSG:{int(code)}"
    return None


GEO_EXTRA = "pip install 'orbitgen[geo]'"


def transform_of(geo: dict) -> list[float] | None:
    """The raster's affine transform from ModelTransformation, or ModelPixelScale + one
    ModelTiepoint; None for a raster without georeferencing. NeedsAffine for tie points (GCPs)
    without one transform, or tags too short to hold one."""
    if geo.get("ModelTransformation") is not None:
        m = np.asarray(geo["ModelTransformation"], float).reshape(-1)
        if m.size < 16:
            raise NeedsAffine(f"ModelTransformation holds {m.size} values, not 16; {WARP_HINT}")
        return [float(v) for v in (m[0], m[1], m[3], m[4], m[5], m[7])]
    scale, tie = geo.get("ModelPixelScale"), geo.get("ModelTiepoint")
    if tie is None:
        return None  # not georeferenced: tiles carry no coordinates
    ties = np.asarray(tie, float).reshape(-1)
    if ties.size % 6 or ties.size == 0:
        raise NeedsAffine(f"ModelTiepoint holds {ties.size} values, not 6 per tie point; {WARP_HINT}")
    if ties.size > 6:
        raise NeedsAffine(f"georeferenced by {ties.size // 6} tie points (ground control points), not an affine "
                          f"transform; {WARP_HINT}")
    scale = np.asarray(scale if scale is not None else [], float).reshape(-1)
    if scale.size < 2:
        raise NeedsAffine(f"one tie point without ModelPixelScale gives no pixel size; {WARP_HINT}")
    i, j, _, x, y, _ = ties
    return [float(v) for v in (scale[0], 0.0, x - i * scale[0], 0.0, -scale[1], y + j * scale[1])]


def read_raster(data: bytes, name: str = "GeoTIFF") -> tuple[np.ndarray, dict, float | None]:
    """(array (H, W, bands) in the file's dtype, GeoTIFF tags, nodata value); the header is checked
    (UnreadableImage: zero bands, or more than $ORBITGEN_MAX_RASTER_BYTES decoded) before any strip."""
    import tifffile

    header = tiff_header(data, name)
    if header.decoded_bytes > max_raster_bytes():
        raise UnreadableImage(f"{name}: {header.width}x{header.height} pixels x {header.bands} bands of {header.mode} "
                              f"= {header.decoded_bytes:,} bytes decoded, more than the {max_raster_bytes():,} "
                              f"allowed (not read; {GEO_EXTRA} to tile it in windows, raise "
                              "$ORBITGEN_MAX_RASTER_BYTES, or cut the scene)")

    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        page = tif.pages[0]
        geo = page.geotiff_tags or {}
        tag = page.tags.get(42113)  # GDAL_NODATA, stored as text
        nodata = float(str(tag.value).strip("\x00 ")) if tag is not None else None
    return tiff_array(data, name), geo, nodata


def _rasters(source: str) -> tuple[object, str, list[str]]:
    fs, path = filesystem(source)
    path = path.rstrip("/")
    if fs.isfile(path):
        return fs, path.rsplit("/", 1)[0], [path.rsplit("/", 1)[1]]
    if fs.isdir(path):
        return fs, path, sorted(p[len(path) + 1:] for p in fs.find(path) if p.lower().endswith(TIFF_EXTENSIONS))
    raise InputNotFound(f"{source}: no such file or folder")


def read_geotiff(source: str, resolution: int, channels: str | int | None = "keep", stride: int | None = None,
                 max_nodata: float = 0.0, bands: str | list[int] | None = None) -> Source:
    policy = channel_policy(channels)
    stride = stride or resolution
    if stride < 1 or not 0 <= max_nodata <= 1:
        raise UserError("stride must be >= 1 and max_nodata within [0, 1]")
    band_indexes = parse_bands(bands)
    windowed = rasterio_or_none()
    fs, base, rels = _rasters(source)
    if not rels:
        raise UserError(f"{source}: no .tif/.tiff files")
    source_notes: list[str] = []
    counts = {"tiles": 0, "dropped": 0}

    def tiles(rel: str) -> Iterator[Sample | Skipped]:
        if windowed is not None:
            yield from windowed(fs, f"{base}/{rel}", rel, key_from_path(rel), resolution, stride, max_nodata, policy,
                                band_indexes, counts)
            return
        try:
            with fs.open(f"{base}/{rel}", "rb") as f:
                raster, geo, nodata = read_raster(f.read(), rel)
            transform, crs = transform_of(geo), crs_of(geo)
            if band_indexes is not None:
                if max(band_indexes) > raster.shape[2]:
                    raise UserError(f"has {raster.shape[2]} band{'s' * (raster.shape[2] != 1)}; bands "
                                    f"{band_indexes} asked for")
                raster = raster[:, :, [i - 1 for i in band_indexes]]
        except UserError as exc:  # refused with a reason: its message may start with the raster's name
            yield Skipped(rel, str(exc).removeprefix(f"{rel}: "))
            return
        except Exception as exc:  # one unreadable raster is that raster's problem
            yield Skipped(rel, f"cannot read GeoTIFF: {type(exc).__name__}: {exc}")
            return
        h, w, n_bands = raster.shape
        if h < resolution or w < resolution:
            yield Skipped(rel, f"{h}x{w} pixels: smaller than one {resolution}x{resolution} tile")
            return
        invalid = np.isnan(raster).any(axis=2) if raster.dtype.kind == "f" else np.zeros((h, w), bool)
        if nodata is not None:
            invalid |= (raster == nodata).all(axis=2)
        meta = {"source": rel, "crs": crs, "bands": n_bands, "dtype": str(raster.dtype), "nodata": nodata}
        if band_indexes is not None:
            meta["band_indexes"] = band_indexes
        if raster.dtype != np.uint8:
            valid = raster[~invalid]
            lo, hi = (valid.min(axis=0), valid.max(axis=0)) if valid.size else (np.zeros(n_bands), np.ones(n_bands))
            meta["range"] = [[float(v) for v in lo], [float(v) for v in hi]]  # stretched to 0..255, per band
            raster = to_uint8(raster, lo, hi)
        stem = key_from_path(rel)
        for row in range(0, h - resolution + 1, stride):
            for col in range(0, w - resolution + 1, stride):
                counts["tiles"] += 1
                if invalid[row:row + resolution, col:col + resolution].mean() > max_nodata:
                    counts["dropped"] += 1
                    continue
                tile = apply_channels(raster[row:row + resolution, col:col + resolution], policy)
                yield Sample(key=f"{stem}-r{row:06d}-c{col:06d}", image=np.ascontiguousarray(tile),
                             meta={**meta, "row": row, "col": col,
                                   "transform": tile_transform(transform, row, col),
                                   "bounds": tile_bounds(transform, row, col, resolution)})

    def items() -> Iterator[Sample | Skipped]:
        for rel in rels:
            yield from tiles(rel)
        if counts["dropped"]:
            source_notes.append(f"{counts['dropped']} of {counts['tiles']} tiles dropped as nodata")

    return Source(items(), notes=source_notes)
