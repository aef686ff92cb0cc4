"""A Cloud-Optimised GeoTIFF on the loopback S3 server tiles through the GeoTIFF layout, read by
byte ranges (rasterio over fsspec), and every sample carries its CRS, transform and bounds."""
from __future__ import annotations

import numpy as np
import pytest

from data_shards.build import build
from data_shards.storage import filesystem

pytestmark = pytest.mark.integration
ORIGIN, PIXEL, TILE = (300000.0, 5100000.0), 20.0, 256
KEY = "geotiff/scene.tif"


@pytest.fixture(scope="module")
def cog_url(s3_server, tmp_path_factory):
    """A 3-band uint16 COG (256² blocks, overviews) of 1024 x 768 pixels (4.5 MB of noise, hardly
    compressible), its top-right tile nodata."""
    rasterio = pytest.importorskip("rasterio")
    from rasterio.shutil import copy
    from rasterio.transform import from_origin

    local = tmp_path_factory.mktemp("cog")
    data = np.random.default_rng(5).integers(100, 9000, (3, 768, 1024)).astype(np.uint16)
    data[:, :TILE, 3 * TILE:] = 0
    profile = dict(driver="GTiff", width=1024, height=768, count=3, dtype="uint16", crs="EPSG:32632",
                   transform=from_origin(*ORIGIN, PIXEL, PIXEL), nodata=0)
    with rasterio.open(local / "plain.tif", "w", **profile) as dst:
        dst.write(data)
    copy(local / "plain.tif", local / "scene.tif", driver="COG", blocksize=256, compress="deflate",
         overview_resampling="nearest")
    url = f"s3://orbitgen/{KEY}"
    fs, path = filesystem(url)
    fs.put(str(local / "scene.tif"), path)
    return url


def test_a_cog_on_s3_tiles_and_its_samples_carry_their_bounds(s3_server, cog_url, tmp_path):
    from data_shards.stream import iterate_once

    res = build(cog_url, str(tmp_path / "set"), layout="geotiff", resolution=TILE, bands="3,2,1", progress=False)
    assert res.notes == ["1 of 12 tiles dropped as nodata"] and res.card.count == 11 and res.card.channels == 3
    (batch,) = list(iterate_once(str(tmp_path / "set"), batch_size=64, keys=("image", "json")))
    assert "scene-r000000-c000768" not in batch["__key__"]
    for key, meta in zip(batch["__key__"], batch["json"]):
        row, col = meta["row"], meta["col"]
        assert key == f"scene-r{row:06d}-c{col:06d}" and meta["source"] == "scene.tif"
        left, top = ORIGIN[0] + col * PIXEL, ORIGIN[1] - row * PIXEL
        assert meta["crs"] == "EPSG:32632" and meta["band_indexes"] == [3, 2, 1]
        assert meta["transform"] == [PIXEL, 0.0, left, 0.0, -PIXEL, top]
        assert meta["bounds"] == [left, top - TILE * PIXEL, left + TILE * PIXEL, top]

    # Read by byte ranges (HTTP 206), never fetched whole by one plain GET.
    gets = [line for line in s3_server.log.read_text().splitlines() if f"GET /orbitgen/{KEY} " in line]
    assert len(gets) >= 3 and all('" 206 ' in line for line in gets), gets[:5]
