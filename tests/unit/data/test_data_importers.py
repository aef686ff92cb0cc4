"""Importers accept what the formats allow and refuse the rest in one line: TIFF band layouts,
GeoTIFFs georeferenced by tie points, every dataset.json shape of NVIDIA's dataset_tool, and
users' file names (camera names, spaces, accents, other scripts) as sample keys."""
from __future__ import annotations

import io
import json
import struct
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

from data_shards.build import SourceItemError, build
from data_shards.errors import UserError
from data_shards.sample_keys import key_from_path
from data_shards.stream import iterate_once

GEOKEYS = (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32633)


def everything(url, keys=("image", "json")):
    batches = list(iterate_once(url, batch_size=1000, keys=keys))
    assert len(batches) == 1
    return batches[0]


def png_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def tiff(path, data, georef=("affine",), **kw):
    """A (Geo)TIFF: georef 'affine' (pixel scale + one tie point), 'gcps' (three tie points, no
    scale), 'gcps+scale', 'tie-only' (one tie point, no scale) or nothing."""
    import tifffile

    tags = []
    if "affine" in georef:
        tags += [(33550, "d", 3, (10.0, 10.0, 0.0), True), (33922, "d", 6, (0, 0, 0, 500000.0, 4000000.0, 0), True)]
    if "gcps" in georef or "gcps+scale" in georef:
        gcps = (0, 0, 0, 10.0, 50.0, 0, 16, 0, 0, 11.0, 50.0, 0, 0, 16, 0, 10.0, 49.0, 0)
        tags.append((33922, "d", len(gcps), gcps, True))
    if "gcps+scale" in georef:
        tags.append((33550, "d", 3, (1.0, 1.0, 0.0), True))
    if "tie-only" in georef:
        tags.append((33922, "d", 6, (0, 0, 0, 500000.0, 4000000.0, 0), True))
    if georef:
        tags.append((34735, "H", len(GEOKEYS), GEOKEYS, True))
    tifffile.imwrite(path, data, extratags=tags, **kw)


def geotiff_build(tmp_path, source, **kw):
    return build(str(source), str(tmp_path / "out"), layout="geotiff", resolution=4, progress=False, **kw)


@pytest.fixture
def whole_raster_reader(monkeypatch):
    """The tifffile reader that reads each raster whole: what runs without the `orbitgen[geo]` extra
    (rasterio's own checks are in test_geotiff_windowed.py)."""
    monkeypatch.setitem(sys.modules, "rasterio", None)


@pytest.fixture(params=["windowed", "whole"])
def either_reader(request, monkeypatch):
    """Each GeoTIFF reader in turn: rasterio's windows (the `orbitgen[geo]` extra), then tifffile's."""
    if request.param == "whole":
        monkeypatch.setitem(sys.modules, "rasterio", None)
    else:
        pytest.importorskip("rasterio")


# --- TIFF bands -----------------------------------------------------------------------------------

def test_a_tiff_with_zero_bands_is_refused_in_one_line(either_reader, tmp_path):
    """Today: 4 tiles of 0 bands each, exit 0."""
    tiff(tmp_path / "empty.tif", np.zeros((8, 8, 0), np.uint8))
    with pytest.raises(SourceItemError, match=r"^empty.tif: a TIFF with zero bands or no pixels") as err:
        geotiff_build(tmp_path, tmp_path / "empty.tif")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "empty.tif").write_bytes((tmp_path / "empty.tif").read_bytes())
    with pytest.raises(SourceItemError, match=r"^empty.tif: cannot read image: a TIFF with zero bands"):
        build(str(tmp_path / "photos"), str(tmp_path / "out"), layout="folder", resolution=4, progress=False)


def test_a_tiff_declaring_zero_samples_per_pixel_is_refused(either_reader, tmp_path):
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, np.arange(64, dtype=np.uint8).reshape(8, 8), photometric="minisblack")
    data = bytearray(buf.getvalue())
    entry = tifffile.TiffFile(io.BytesIO(bytes(data))).pages[0].tags[277].offset
    data[entry + 8:entry + 10] = struct.pack("<H", 0)   # SamplesPerPixel = 0
    (tmp_path / "zero.tif").write_bytes(bytes(data))
    with pytest.raises(SourceItemError, match="SamplesPerPixel 0"):
        geotiff_build(tmp_path, tmp_path / "zero.tif")


def test_several_multi_band_images_in_one_tiff_are_refused_not_reshaped(either_reader, tmp_path):
    tiff(tmp_path / "stack.tif", np.zeros((2, 8, 8, 3), np.uint8), photometric="rgb")
    with pytest.raises(SourceItemError, match=r"^stack.tif: a TIFF of shape \(2, 8, 8, 3\).*several multi-band images"):
        geotiff_build(tmp_path, tmp_path / "stack.tif")


def test_a_raster_larger_than_the_cap_is_refused_before_it_is_read(whole_raster_reader, tmp_path, monkeypatch):
    tiff(tmp_path / "scene.tif", np.ones((16, 16, 3), np.uint16), photometric="rgb")
    monkeypatch.setenv("ORBITGEN_MAX_RASTER_BYTES", "1000")
    says = r"16x16 pixels x 3 bands of uint16 = 1,536 bytes decoded, more than the 1,000"
    with pytest.raises(SourceItemError, match=says):
        geotiff_build(tmp_path, tmp_path / "scene.tif")


# --- GeoTIFF georeferencing -----------------------------------------------------------------------

@pytest.mark.parametrize("georef, says", [
    (("gcps",), "georeferenced by 3 tie points (ground control points), not an affine transform"),
    (("gcps+scale",), "georeferenced by 3 tie points"),            # today: a traceback
    (("tie-only",), "one tie point without ModelPixelScale"),
])
def test_a_geotiff_without_one_affine_transform_is_refused_in_one_line(whole_raster_reader, tmp_path, georef, says):
    tiff(tmp_path / "scene.tif", np.ones((8, 8), np.uint8), georef=georef)
    with pytest.raises(SourceItemError) as err:
        geotiff_build(tmp_path, tmp_path / "scene.tif")
    text = str(err.value)
    assert text.startswith("scene.tif: ") and says in text and "needs an affine transform" in text and "\n" not in text


def test_affine_and_ungeoreferenced_rasters_still_tile(tmp_path):
    tiff(tmp_path / "a.tif", np.ones((8, 8), np.uint8))
    tiff(tmp_path / "plain.tif", np.ones((8, 8), np.uint8), georef=())
    res = geotiff_build(tmp_path, tmp_path / "a.tif")
    assert res.card.count == 4
    meta = everything(str(tmp_path / "out"))["json"][1]
    assert meta["transform"] == [10.0, 0.0, 500040.0, 0.0, -10.0, 4000000.0]
    res = build(str(tmp_path / "plain.tif"), str(tmp_path / "plain"), layout="geotiff", resolution=4, progress=False)
    assert res.card.count == 4


# --- StyleGAN dataset.json ------------------------------------------------------------------------

NAMES = [f"00000/img{i:08d}.png" for i in range(3)]


def stylegan_zip(path, dataset_json: str | None, names=NAMES):
    with zipfile.ZipFile(path, "w") as z:
        for i, name in enumerate(names):
            z.writestr(name, png_bytes(np.full((8, 8, 3), 40 * i, np.uint8)))
        if dataset_json is not None:
            z.writestr("dataset.json", dataset_json)


@pytest.mark.parametrize("doc, classes", [
    ({"labels": None}, None),
    ({"labels": [[n, i] for i, n in enumerate(NAMES)]}, ["0", "1", "2"]),
    ({"labels": {n: 2 - i for i, n in enumerate(NAMES)}}, ["0", "1", "2"]),
    ({"labels": [[n.replace("/", "\\"), 1] for n in NAMES]}, ["0", "1"]),   # written on Windows
])
def test_every_dataset_json_shape_dataset_tool_writes_is_accepted(tmp_path, doc, classes):
    stylegan_zip(tmp_path / "set.zip", json.dumps(doc))
    res = build(str(tmp_path / "set.zip"), str(tmp_path / "out"), layout="stylegan-zip", resolution=8, progress=False)
    assert res.card.count == 3 and res.card.classes == classes and not res.skipped


@pytest.mark.parametrize("text, says", [
    # a bare list: today a traceback
    (json.dumps({"labels": [0, 1, 2]}), "labels [0, 1, 2] are neither name/label pairs nor a mapping"),
    (json.dumps([[NAMES[0], 1]]), "dataset.json holds a JSON list"),
    (json.dumps({"labels": "ab"}), "neither name/label pairs nor a mapping"),
    (json.dumps({"labels": [[NAMES[0], [0.5, 1.0]]]}), "only class indices"),
    (json.dumps({"labels": {NAMES[0]: -1}}), "label -1 of '00000/img00000000.png'"),
    ("{not json", "dataset.json cannot be read as JSON"),
])
def test_other_dataset_json_shapes_are_refused_in_one_line_naming_the_zip(tmp_path, text, says):
    stylegan_zip(tmp_path / "set.zip", text)
    with pytest.raises(UserError) as err:
        build(str(tmp_path / "set.zip"), str(tmp_path / "out"), layout="stylegan-zip", resolution=8, progress=False)
    assert str(err.value).startswith(f"{tmp_path / 'set.zip'}: ") and says in str(err.value), str(err.value)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_a_zip_member_that_inflates_past_the_cap_is_skipped_unread(tmp_path, monkeypatch):
    stylegan_zip(tmp_path / "set.zip", None)
    with zipfile.ZipFile(tmp_path / "set.zip", "a", zipfile.ZIP_DEFLATED) as z:
        z.writestr("00000/img00000009.png", bytes(4 << 20))
    monkeypatch.setenv("ORBITGEN_MAX_IMAGE_PIXELS", str(1 << 16))   # 512 KiB of file per image
    res = build(str(tmp_path / "set.zip"), str(tmp_path / "out"), layout="stylegan-zip", resolution=8,
                on_error="skip", progress=False)
    assert res.card.count == 3
    assert res.skipped == [{"item": "00000/img00000009.png", "reason": "cannot read image: 4194304 bytes uncompressed, "
                            "more than the 524,288 allowed for an image (not read; raise $ORBITGEN_MAX_IMAGE_PIXELS if "
                            "it is meant to be)"}]


def test_a_zip_member_that_lies_about_its_size_is_inflated_in_bounded_memory(tmp_path):
    """A 64 MB member of zeros (64 KB deflated) whose central directory says 0 bytes: zipfile's
    read() inflated all 64 MB in one piece before trimming it to the 0 declared."""
    import tracemalloc

    from data_shards.source_zip import read_stylegan_zip

    stylegan_zip(tmp_path / "set.zip", None, names=NAMES[:1])
    with zipfile.ZipFile(tmp_path / "set.zip", "a") as z:
        info = zipfile.ZipInfo("00000/img00000009.png")
        info.compress_type = zipfile.ZIP_DEFLATED
        with z.open(info, "w") as member:
            for _ in range(64):
                member.write(bytes(1 << 20))
    data = bytearray((tmp_path / "set.zip").read_bytes())
    entry = data.rindex(b"PK\x01\x02")   # the last central directory entry: the lying member
    data[entry + 24:entry + 28] = (0).to_bytes(4, "little")   # uncompressed size: 0
    (tmp_path / "set.zip").write_bytes(bytes(data))
    tracemalloc.start()
    try:
        items = list(read_stylegan_zip(str(tmp_path / "set.zip"), 8).items)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak
    assert [type(i).__name__ for i in items] == ["Sample", "Skipped"]
    assert items[1].item == "00000/img00000009.png" and "CRC" in items[1].reason


# --- file names as sample keys --------------------------------------------------------------------

@pytest.mark.parametrize("name, key", [
    ("_DSC0001.png", "DSC0001"), ("__init__.png", "init__"), ("a/b/img.01.png", "a_b_img_01"),
    ("IMG 0003 (copy).final.JPG", "IMG_0003_copy_final"), ("Été/Ça va.png", "Ete_Ca_va"),
    ("照片.png", "u7167u7247"), ("_.png", "unnamed"), ("sub/_DSC0001.png", "sub__DSC0001"),
    ("e\u0301te\u0301.png", "ete"), ("-x.png", "-x"), ("crater-000001.png", "crater-000001"),
])
def test_key_from_path_makes_a_valid_key_of_any_name(name, key):
    assert key_from_path(name) == key


def test_camera_names_in_a_folder_with_spaces_and_accents_build(tmp_path):
    """Today: `ValueError: sample key '_DSC0001': must ... not start with '_'`."""
    src = tmp_path / "Été 2024 — Côte d'Azur"
    src.mkdir()
    names = ["_DSC0001.png", "_DSC0002.png", "IMG 0003.edit.png", "照片.png"]
    for i, name in enumerate(names):
        Image.fromarray(np.full((10, 10, 3), 50 * i, np.uint8)).save(src / name)
    res = build(str(src), str(tmp_path / "out"), layout="folder", resolution=8, progress=False)
    assert res.card.count == 4 and not res.skipped
    batch = everything(str(tmp_path / "out"))
    sources = dict(zip(batch["__key__"], (j["source"] for j in batch["json"])))
    assert sources == {"DSC0001": "_DSC0001.png", "DSC0002": "_DSC0002.png", "IMG_0003_edit": "IMG 0003.edit.png",
                       "u7167u7247": "照片.png"}


def test_camera_names_in_a_stylegan_zip_build(tmp_path):
    stylegan_zip(tmp_path / "set.zip", None, names=["_DSC0001.png", "_DSC0002.png"])
    res = build(str(tmp_path / "set.zip"), str(tmp_path / "out"), layout="stylegan-zip", resolution=8, progress=False)
    assert everything(str(tmp_path / "out"))["__key__"] == ["DSC0001", "DSC0002"] and res.card.count == 2


def test_two_names_that_map_to_one_key_are_refused_naming_both(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    for name in ("_DSC0001.png", "DSC0001.png"):
        Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(src / name)
    with pytest.raises(UserError) as err:
        build(str(src), str(tmp_path / "out"), layout="folder", resolution=8, progress=False)
    assert str(err.value) == (f"{src}: 'DSC0001.png' and '_DSC0001.png' both map to sample key 'DSC0001'; "
                              "rename one of them")
