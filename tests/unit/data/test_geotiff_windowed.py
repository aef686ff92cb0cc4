"""The GeoTIFF layout through rasterio (`orbitgen[geo]`): tiles read by windows carry their CRS,
transform and bounds; bands are picked and scaled from the file's statistics; nodata is dropped or
filled; peak memory on a 16384² scene stays far below the raster's size. Without rasterio the
whole-raster reader stays and refuses a raster over its cap in one line naming the extra.

Run as a script, this file is the child process of the memory test (see `child`)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_shards.build import SourceItemError, build
from data_shards.geotiff_windows import parse_bands, tile_bounds, tile_transform
from data_shards.source_geotiff import read_geotiff

REPO = Path(__file__).resolve().parents[3]
ORIGIN, PIXEL, EPSG = (500000.0, 4200000.0), 10.0, 32633
BIG = 16384            # the memory test's scene: 16384² uint8, 256 MiB decoded
BIG_STRIDE = 256       # every 256² tile of the scene, 4096 of them: under a second here


def write_scene(path, data: np.ndarray, nodata=0, **profile):
    """(bands, H, W) -> a tiled GeoTIFF in UTM 33N with 10 m pixels."""
    import rasterio
    from rasterio.transform import from_origin

    bands, h, w = data.shape
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=bands, dtype=data.dtype,
                       crs=f"EPSG:{EPSG}", transform=from_origin(*ORIGIN, PIXEL, PIXEL), nodata=nodata,
                       **{"tiled": True, "blockxsize": 16, "blockysize": 16, **profile}) as dst:
        dst.write(data)


def samples(url):
    from data_shards.stream import iterate_once  # torch: not for the memory test's children

    batches = list(iterate_once(url, batch_size=10_000, keys=("image", "json")))
    assert len(batches) == 1
    return {k: (img.permute(1, 2, 0).numpy(), meta) for k, img, meta in
            zip(batches[0]["__key__"], batches[0]["image"], batches[0]["json"])}


# --- placement ------------------------------------------------------------------------------------

def test_tile_transform_and_bounds_agree_with_rasterio_on_a_rotated_grid():
    pytest.importorskip("rasterio")
    from affine import Affine
    from rasterio.windows import Window, bounds, transform

    t = Affine(10.0, 2.0, 500000.0, 1.5, -10.0, 4200000.0)   # rotated and sheared: every term matters
    gdal = [t.a, t.b, t.c, t.d, t.e, t.f]
    for row, col, size in [(0, 0, 16), (32, 48, 16), (7, 3, 64)]:
        w = Window(col, row, size, size)
        assert tile_transform(gdal, row, col) == pytest.approx(list(transform(w, t))[:6])
        corners = [t @ (c, r) for r in (row, row + size) for c in (col, col + size)]
        xs, ys = [x for x, _ in corners], [y for _, y in corners]    # the envelope of all four corners
        assert tile_bounds(gdal, row, col, size) == pytest.approx([min(xs), min(ys), max(xs), max(ys)])
    north_up = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 4200000.0)
    assert tile_bounds(list(north_up)[:6], 32, 48, 16) == pytest.approx(list(bounds(Window(48, 32, 16, 16), north_up)))
    assert tile_transform(None, 1, 1) is None and tile_bounds(None, 1, 1, 4) is None


def test_band_lists_parse_and_bad_ones_are_refused():
    assert parse_bands("3, 1") == [3, 1] and parse_bands([2]) == [2] and parse_bands(None) is None
    for bad in ("0", "red", "1,,2"):
        with pytest.raises(ValueError, match="bands"):
            parse_bands(bad)


# --- tiles ----------------------------------------------------------------------------------------

def test_tiles_carry_crs_transform_bounds_picked_bands_and_scaling_from_statistics(tmp_path):
    pytest.importorskip("rasterio")
    rng = np.random.default_rng(3)
    data = rng.integers(200, 4000, (3, 48, 64)).astype(np.uint16)
    data[:, :16, 48:] = 0              # the top-right tile is all nodata: dropped
    data[:, 16:20, :16] = 0            # 4 of 16 rows of tile (16, 0) are nodata: kept, filled
    data[2, 40, 40] = 0                # one band only at nodata: a valid pixel
    write_scene(tmp_path / "scene.tif", data)

    res = build(str(tmp_path / "scene.tif"), str(tmp_path / "set"), layout="geotiff", resolution=16,
                max_nodata=0.3, bands="3,1", progress=False)
    assert res.notes == ["1 of 12 tiles dropped as nodata"]
    got = samples(str(tmp_path / "set"))
    assert len(got) == 11 and "scene-r000000-c000048" not in got

    picked = data[[2, 0]].astype(np.float64)                     # bands 3 and 1, in that order
    valid = ~(picked == 0).all(axis=0)                            # nodata: every picked band at 0
    lo = np.array([p[p != 0].min() for p in picked])              # the range: each band's own valid values
    hi = np.array([p[p != 0].max() for p in picked])
    for key, row, col in [("scene-r000016-c000000", 16, 0), ("scene-r000032-c000032", 32, 32)]:
        image, meta = got[key]
        assert meta["crs"] == f"EPSG:{EPSG}" and meta["band_indexes"] == [3, 1] and meta["bands"] == 2
        left, top = ORIGIN[0] + col * PIXEL, ORIGIN[1] - row * PIXEL
        assert meta["transform"] == [PIXEL, 0.0, left, 0.0, -PIXEL, top]
        assert meta["bounds"] == [left, top - 16 * PIXEL, left + 16 * PIXEL, top]
        assert np.array(meta["range"]) == pytest.approx(np.stack([lo, hi]))
        tile = np.moveaxis(picked[:, row:row + 16, col:col + 16], 0, -1)
        expect = np.floor(np.clip((tile - lo) / (hi - lo), 0, 1) * 255 + 0.5)
        expect[~valid[row:row + 16, col:col + 16]] = 0                # nodata filled with 0
        assert np.abs(image.astype(float) - expect).max() <= 1
        assert meta["nodata_fraction"] == pytest.approx(1 - valid[row:row + 16, col:col + 16].mean())
    assert got["scene-r000016-c000000"][1]["nodata_fraction"] == pytest.approx(0.25)


def test_a_nan_pixel_is_nodata_and_8_bit_bands_are_kept_as_they_are(tmp_path):
    pytest.importorskip("rasterio")
    f = np.full((1, 16, 32), 5.0, np.float32)
    f[0, :, 16:] = np.nan
    f[0, 0, 0] = 1.0
    write_scene(tmp_path / "float.tif", f, nodata=None)
    items = list(read_geotiff(str(tmp_path / "float.tif"), 16).items)
    assert [s.key for s in items] == ["float-r000000-c000000"]      # the NaN tile dropped
    assert items[0].image[0, 0, 0] == 0 and items[0].image[1, 1, 0] == 255
    b = np.arange(2 * 16 * 16, dtype=np.uint8).reshape(2, 16, 16)
    write_scene(tmp_path / "bytes.tif", b, nodata=None)
    source = read_geotiff(str(tmp_path / "bytes.tif"), 16)
    (tile,) = source.items
    assert np.array_equal(tile.image, np.moveaxis(b, 0, -1)) and "range" not in tile.meta
    assert source.notes == []                                      # nothing dropped: no "0 of 1" note


def test_an_alpha_band_masks_the_others_and_is_not_kept(tmp_path):
    pytest.importorskip("rasterio")
    rgba = np.full((4, 16, 32), 200, np.uint8)
    rgba[3, :, 16:] = 0                                           # the right tile fully transparent
    rgba[3, 0, :4] = 0                                            # 4 transparent pixels in the left one
    write_scene(tmp_path / "rgba.tif", rgba, nodata=None, photometric="RGB", alpha="YES")
    (tile,) = read_geotiff(str(tmp_path / "rgba.tif"), 16, max_nodata=0.1).items
    assert tile.image.shape == (16, 16, 3) and tile.meta["band_indexes"] == [1, 2, 3]
    assert (tile.image[0, :4] == 0).all() and (tile.image[1:] == 200).all()
    assert tile.meta["nodata_fraction"] == pytest.approx(4 / 256)


@pytest.mark.parametrize("georef, says", [
    ("gcps", "georeferenced by 3 tie points (ground control points), not an affine transform"),
    ("one-gcp", "one tie point without ModelPixelScale"),
])
def test_a_raster_placed_by_ground_control_points_is_refused_in_one_line(tmp_path, georef, says):
    rasterio = pytest.importorskip("rasterio")
    from rasterio.control import GroundControlPoint

    points = [GroundControlPoint(0, 0, 10.0, 50.0), GroundControlPoint(0, 16, 11.0, 50.0),
              GroundControlPoint(16, 0, 10.0, 49.0)][: 3 if georef == "gcps" else 1]
    with rasterio.open(tmp_path / "scene.tif", "w", driver="GTiff", width=16, height=16, count=1,
                       dtype="uint8", gcps=points, crs="EPSG:4326") as dst:
        dst.write(np.ones((1, 16, 16), np.uint8))
    with pytest.raises(SourceItemError) as err:
        build(str(tmp_path / "scene.tif"), str(tmp_path / "out"), layout="geotiff", resolution=8, progress=False)
    text = str(err.value)
    assert text.startswith("scene.tif: ") and says in text and "needs an affine transform" in text
    assert "\n" not in text and not (tmp_path / "out").exists()


def test_bands_beyond_the_raster_and_blocks_over_the_cap_are_refused_in_one_line(tmp_path, monkeypatch):
    pytest.importorskip("rasterio")
    write_scene(tmp_path / "scene.tif", np.ones((2, 32, 32), np.uint16))
    with pytest.raises(SourceItemError, match=r"^scene.tif: has 2 bands; bands \[1, 3\] asked for$"):
        build(str(tmp_path / "scene.tif"), str(tmp_path / "o"), layout="geotiff", resolution=8, bands="1,3",
              progress=False)
    # One strip for the whole raster: its first window would decode all of it.
    write_scene(tmp_path / "strip.tif", np.ones((1, 64, 64), np.uint16), tiled=False, blockysize=64)
    monkeypatch.setenv("ORBITGEN_MAX_RASTER_BYTES", "4096")
    with pytest.raises(SourceItemError, match=r"^strip.tif: stored in blocks of 64x64 pixels x 1 bands = 8,192 "
                                              r"bytes .* more than the 4,096 .*TILED=YES"):
        build(str(tmp_path / "strip.tif"), str(tmp_path / "o"), layout="geotiff", resolution=8, progress=False)


def test_a_tile_reader_left_half_read_does_not_pop_another_callers_gdal_environment(tmp_path):
    import gc

    rasterio = pytest.importorskip("rasterio")
    write_scene(tmp_path / "scene.tif", np.ones((1, 32, 32), np.uint16))
    tiles = iter(read_geotiff(str(tmp_path / "scene.tif"), 8).items)
    next(tiles)   # suspended inside the open raster
    with rasterio.Env():   # another caller's environment, on top of this thread's stack
        del tiles
        gc.collect()   # the reader is finalised now, as the garbage collector may do at any point
    # Leaving the Env above raised "No GDAL environment exists" when the reader had popped it.


# --- without the extra ----------------------------------------------------------------------------

def test_without_rasterio_the_whole_raster_reader_stays_and_names_the_extra_over_its_cap(tmp_path, monkeypatch):
    import tifffile

    data = np.arange(16 * 16 * 2, dtype=np.uint16).reshape(16, 16, 2) + 1
    geokeys = (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, EPSG)
    tifffile.imwrite(tmp_path / "scene.tif", data, photometric="minisblack", planarconfig="contig", extratags=[
        (33550, "d", 3, (PIXEL, PIXEL, 0.0), True), (33922, "d", 6, (0, 0, 0, *ORIGIN, 0), True),
        (34735, "H", len(geokeys), geokeys, True)])
    monkeypatch.setitem(sys.modules, "rasterio", None)           # `import rasterio` raises ImportError

    items = list(read_geotiff(str(tmp_path / "scene.tif"), 8, bands="2").items)
    assert len(items) == 4 and items[0].image.shape == (8, 8, 1) and items[0].meta["band_indexes"] == [2]
    last = items[3].meta
    assert (last["row"], last["col"]) == (8, 8)
    assert last["bounds"] == [ORIGIN[0] + 80, ORIGIN[1] - 160, ORIGIN[0] + 160, ORIGIN[1] - 80]

    monkeypatch.setenv("ORBITGEN_MAX_RASTER_BYTES", "1000")
    with pytest.raises(SourceItemError) as err:
        build(str(tmp_path / "scene.tif"), str(tmp_path / "o"), layout="geotiff", resolution=8, progress=False)
    text = str(err.value)
    assert text.startswith("scene.tif: 16x16 pixels x 2 bands of uint16 = 1,024 bytes decoded, more than the 1,000")
    assert "pip install 'orbitgen[geo]'" in text and "\n" not in text


# --- memory ---------------------------------------------------------------------------------------

def test_a_16k_scene_tiles_in_memory_far_below_its_size(tmp_path):
    """The scene (16384², 256 MiB decoded) is written and tiled in child processes, so their peaks
    are their own; each must stay far below the raster's size. Measured here: ~45 MiB (writer)
    and ~20 MiB (tiling) above the imports; the whole-raster reader needs over 512 MiB."""
    pytest.importorskip("rasterio")
    scene = tmp_path / "scene.tif"
    wrote = run_child("write", scene)
    assert scene.stat().st_size < 32 << 20                         # compressed: the writer did not pad
    tiled = run_child("tile", scene)
    across = (BIG - 256) // BIG_STRIDE + 1
    assert tiled["samples"] == across * across and tiled["last_bounds"][0] > ORIGIN[0] + 15000 * PIXEL
    raster_mib = BIG * BIG / 2**20
    print(f"\n16k scene: writer +{wrote['growth_mib']} MiB, tiling +{tiled['growth_mib']} MiB "
          f"({tiled['seconds']} s), raster {raster_mib:.0f} MiB")
    assert wrote["growth_mib"] < 128 and tiled["growth_mib"] < 100


def run_child(mode: str, scene: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, mode, str(scene)], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_rss_mib() -> float:
    """VmHWM: this process's own peak (ru_maxrss would carry the parent's across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(mode: str, scene: str) -> dict:
    """write: the 16k scene, 512 rows at a time (tiled 512², zstd, GDAL's cache capped);
    tile: every tile at BIG_STRIDE through the layout reader."""
    import time

    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    start, t0 = peak_rss_mib(), time.perf_counter()   # after the imports: the growth is the scene's
    out: dict = {}
    if mode == "write":
        profile = dict(driver="GTiff", width=BIG, height=BIG, count=1, dtype="uint8", crs=f"EPSG:{EPSG}",
                       transform=from_origin(*ORIGIN, PIXEL, PIXEL), nodata=0, tiled=True, blockxsize=512,
                       blockysize=512, compress="zstd")
        with rasterio.Env(GDAL_CACHEMAX=64), rasterio.open(scene, "w", **profile) as dst:
            for row in range(0, BIG, 512):
                # Each 512² block one value, varying across the scene: cheap to make and to compress.
                line = ((np.arange(BIG) // 512 * 3 + row // 512 * 37) % 250 + 1).astype(np.uint8)
                dst.write(np.ascontiguousarray(np.broadcast_to(line, (512, BIG))), 1, window=Window(0, row, BIG, 512))
    else:
        n, last, skipped = 0, None, []
        for item in read_geotiff(scene, 256, stride=BIG_STRIDE).items:
            if hasattr(item, "reason"):
                skipped.append(f"{item.item}: {item.reason}")
            else:
                n, last = n + 1, item.meta["bounds"]
        out = {"samples": n, "last_bounds": last, "skipped": skipped[:3]}
    return {**out, "growth_mib": round(peak_rss_mib() - start, 1), "seconds": round(time.perf_counter() - t0, 2)}


if __name__ == "__main__":
    print(json.dumps(child(sys.argv[1], sys.argv[2])))
