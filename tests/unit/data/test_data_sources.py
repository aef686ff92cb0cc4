"""Every source layout builds from a small source: pixels, readers, the build's on-error policy."""
from __future__ import annotations

import csv
import io
import json
import os
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from data_shards.build import SourceItemError, build, parse_shard_size
from data_shards.card import read_manifest
from data_shards.pixels import apply_channels, channel_policy, fit, luma, to_uint8
from data_shards.sources import Skipped, read_folder
from data_shards.stream import iterate_once

RNG = np.random.default_rng(0)


def noise(h, w, c=3, dtype=np.uint8):
    hi = 256 if dtype == np.uint8 else 65536
    a = RNG.integers(0, hi, (h, w, c)).astype(dtype)
    return a[:, :, 0] if c == 1 else a


def save(path, a, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a, mode).save(path)


def everything(url, keys):
    """All samples of a set, in order, as one batch dict."""
    batches = list(iterate_once(url, batch_size=1000, keys=keys))
    assert len(batches) == 1
    return batches[0]


# --- pixels ------------------------------------------------------------------------------------

def test_channel_policies_and_fit():
    assert [channel_policy(v) for v in (None, 1, 3, "1", "3", "keep", "gray", "rgb")] == \
        ["keep", "gray", "rgb", "gray", "rgb", "keep", "gray", "rgb"]
    with pytest.raises(ValueError, match="keep, gray, rgb"):
        channel_policy(2)
    rgb = noise(5, 7)
    assert (luma(rgb)[:, :, 0] == np.asarray(Image.fromarray(rgb).convert("L"))).all()  # same as PIL's L
    six = noise(6, 4, 6)
    assert apply_channels(six, "keep").shape == (6, 4, 6)
    assert (apply_channels(six, "rgb") == six[:, :, :3]).all()
    assert apply_channels(six, "gray").shape == (6, 4, 1)
    gray = noise(6, 4, 1)[:, :, None]
    assert (apply_channels(gray, "rgb") == np.repeat(gray, 3, axis=2)).all()
    # centre crop then resize, any band count: each band as PIL resizes it alone
    wide = np.concatenate([six, six], axis=1)  # 6 x 8: the centre square is columns 1..6
    out = fit(wide, 3)
    band0 = Image.fromarray(np.ascontiguousarray(wide[:, 1:7, 0])).resize((3, 3), Image.Resampling.LANCZOS)
    assert out.shape == (3, 3, 6) and (out[:, :, 0] == np.asarray(band0)).all()
    assert to_uint8(np.array([[0, 65535]], np.uint16)).tolist() == [[0, 255]]
    assert to_uint8(np.array([[-1.0, 0.0, 1.0]])).tolist() == [[0, 128, 255]]


# --- folder ------------------------------------------------------------------------------------

def test_read_folder_resizes_converts_names_and_skips_broken_files(tmp_path):
    save(tmp_path / "a.png", noise(30, 40, 1), "L")
    save(tmp_path / "sub" / "b.jpg", noise(80, 50))
    save(tmp_path / "sub" / "c.v2.png", noise(20, 20, 4), "RGBA")
    save(tmp_path / "sub" / "deeper" / "d.tif", noise(33, 33, 1, np.uint16))
    (tmp_path / "notes.txt").write_text("not an image")

    by_channels = {ch: list(read_folder(str(tmp_path), 24, ch)) for ch in ("gray", "rgb", "keep")}
    keys = [s.key for s in by_channels["gray"]]
    assert keys == ["a", "sub_b", "sub_c_v2", "sub_deeper_d"]
    assert [s.meta["source"] for s in by_channels["gray"]] == ["a.png", "sub/b.jpg", "sub/c.v2.png", "sub/deeper/d.tif"]
    for ch, want in (("gray", [1, 1, 1, 1]), ("rgb", [3, 3, 3, 3]), ("keep", [1, 3, 3, 1])):
        assert [s.image.shape for s in by_channels[ch]] == [(24, 24, c) for c in want]
        assert all(s.image.dtype == np.uint8 for s in by_channels[ch])
    assert by_channels["gray"][3].image.std() > 20  # 16-bit data scaled, not clipped to white

    (tmp_path / "sub" / "broken.png").write_bytes(b"\x89PNG garbage")
    items = list(read_folder(str(tmp_path), 24, "gray"))
    bad = [i for i in items if isinstance(i, Skipped)]
    assert len(items) == 5 and [b.item for b in bad] == ["sub/broken.png"] and "cannot read" in bad[0].reason


def test_folder_of_gray_images_builds_a_one_channel_set(tmp_path):
    for i in range(5):
        save(tmp_path / "src" / f"probe{i}.png", noise(40, 36, 1), "L")
    res = build(str(tmp_path / "src"), str(tmp_path / "set"), layout="folder", resolution=16, shard_size="2",
                progress=False)
    card = res.card
    assert (card.layout, card.channels, card.count, card.shards, card.modalities) == \
        ("folder", 1, 5, 3, ["image", "json"])
    batch = everything(str(tmp_path / "set"), ("image", "json"))
    assert tuple(batch["image"].shape) == (5, 1, 16, 16)
    assert [j["source"] for j in batch["json"]] == [f"probe{i}.png" for i in range(5)]


def test_mixed_channel_counts_fail_or_skip(tmp_path):
    save(tmp_path / "src" / "a.png", noise(16, 16, 1), "L")
    save(tmp_path / "src" / "b.png", noise(16, 16))
    save(tmp_path / "src" / "c.png", noise(16, 16, 1), "L")
    with pytest.raises(SourceItemError, match=r"b\.png: \[3\] channels, earlier items 1"):
        build(str(tmp_path / "src"), str(tmp_path / "failed"), layout="folder", resolution=8, progress=False)
    assert not (tmp_path / "failed").exists() or os.listdir(tmp_path / "failed") == []
    res = build(str(tmp_path / "src"), str(tmp_path / "set"), layout="folder", resolution=8, on_error="skip",
                progress=False)
    assert res.card.count == 2 and res.card.skipped == 1
    assert [s["item"] for s in res.skipped] == ["b.png"]
    report = [json.loads(line) for line in (tmp_path / "set" / "skipped.jsonl").read_text().splitlines()]
    assert report == res.skipped
    # Converting instead keeps everything.
    assert build(str(tmp_path / "src"), str(tmp_path / "rgb"), layout="folder", resolution=8, channels="rgb",
                 progress=False).card.count == 3


# --- class folders, StyleGAN zip ----------------------------------------------------------------

def test_class_folders(tmp_path):
    src = tmp_path / "scenes"
    for cls, n in (("river", 2), ("desert", 3)):
        for i in range(n):
            save(src / cls / ("sub" if i else "") / f"{i}.png", noise(20, 20))
    save(src / "stray.png", noise(20, 20))
    with pytest.raises(SourceItemError, match="stray.png: not inside a class folder"):
        build(str(src), str(tmp_path / "x"), layout="class-folders", resolution=8, progress=False)
    res = build(str(src), str(tmp_path / "set"), layout="class-folders", resolution=8, on_error="skip", progress=False)
    assert res.card.classes == ["desert", "river"] and res.card.modalities == ["image", "cls", "json"]
    batch = everything(str(tmp_path / "set"), ("image", "cls", "json"))
    assert batch["cls"].tolist() == [0, 0, 0, 1, 1]
    assert [j["class"] for j in batch["json"]] == ["desert"] * 3 + ["river"] * 2
    assert batch["__key__"][1] == "desert_sub_1"


def write_stylegan_zip(path, n, labels=True):
    with zipfile.ZipFile(path, "w") as z:
        names = []
        for i in range(n):
            name = f"00000/img{i:08d}.png"
            img = Image.fromarray(noise(24, 24, 1), "L")
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            z.writestr(name, buf.getvalue())
            names.append(name)
        if labels:
            z.writestr("dataset.json", json.dumps({"labels": [[name, i % 3] for i, name in enumerate(names)]}))


def test_stylegan_zip_with_and_without_labels(tmp_path):
    write_stylegan_zip(tmp_path / "labelled.zip", 6)
    res = build(str(tmp_path / "labelled.zip"), str(tmp_path / "a"), layout="stylegan-zip", resolution=16, progress=False)
    assert (res.card.count, res.card.channels, res.card.classes) == (6, 1, ["0", "1", "2"])
    batch = everything(str(tmp_path / "a"), ("image", "cls"))
    assert batch["cls"].tolist() == [0, 1, 2, 0, 1, 2] and batch["__key__"][0] == "00000_img00000000"

    write_stylegan_zip(tmp_path / "plain.zip", 4, labels=False)
    res = build(str(tmp_path / "plain.zip"), str(tmp_path / "b"), layout="stylegan-zip", resolution=16, progress=False)
    assert res.card.modalities == ["image", "json"] and res.card.classes is None and res.card.count == 4

    (tmp_path / "bad.zip").write_bytes(b"PK not really")
    with pytest.raises(ValueError, match="not a StyleGAN dataset zip"):
        build(str(tmp_path / "bad.zip"), str(tmp_path / "c"), layout="stylegan-zip", resolution=16, progress=False)


# --- pairs ---------------------------------------------------------------------------------------

def test_side_by_side_takes_the_input_half_as_cond(tmp_path):
    left, right = np.full((30, 30, 3), 40, np.uint8), np.full((30, 30, 3), 200, np.uint8)
    for i in range(3):
        save(tmp_path / "maps" / f"{i}.jpg", np.concatenate([left, right], axis=1))
    for side, cond_value in (("left", 40), ("right", 200)):
        dest = tmp_path / side
        card = build(str(tmp_path / "maps"), str(dest), layout="side-by-side", resolution=16, input_side=side,
                     progress=False).card
        assert card.modalities == ["image", "cond", "json"]
        batch = everything(str(dest), ("cond", "image"))
        assert tuple(batch["cond"].shape) == tuple(batch["image"].shape) == (3, 3, 16, 16)
        assert abs(batch["cond"].float().mean() - cond_value) < 3
        assert abs(batch["image"].float().mean() - (240 - cond_value)) < 3


def test_paired_folders_match_by_stem_and_report_the_unmatched(tmp_path):
    src = tmp_path / "pairs"
    for stem in ("a", "b", "sub/c"):
        save(src / "sat" / f"{stem}.png", noise(20, 20))
        save(src / "ground" / f"{stem}.jpg", noise(30, 40))
    save(src / "sat" / "lonely.png", noise(20, 20))
    save(src / "ground" / "orphan.jpg", noise(20, 20))
    with pytest.raises(SourceItemError, match=r"sat/lonely.png: no matching file in ground/"):
        build(str(src), str(tmp_path / "x"), layout="paired-folders", resolution=8, cond_dir="sat",
              image_dir="ground", progress=False)
    res = build(str(src), str(tmp_path / "set"), layout="paired-folders", resolution=8, cond_dir="sat",
                image_dir="ground", on_error="skip", progress=False)
    assert sorted(s["item"] for s in res.skipped) == ["ground/orphan.jpg", "sat/lonely.png"]
    batch = everything(str(tmp_path / "set"), ("cond", "image", "json"))
    assert batch["__key__"] == ["a", "b", "sub_c"]
    assert batch["json"][2] == {"source": "ground/sub/c.jpg", "cond_source": "sat/sub/c.png"}


def test_timeseries_csv(tmp_path):
    src = tmp_path / "spacenet"
    rows = []
    for i in range(3):
        save(src / "images" / f"t0_{i}.png", noise(24, 24))
        save(src / "images" / f"t1_{i}.png", noise(24, 24))
        save(src / "masks" / f"m_{i}.png", (RNG.random((24, 24)) > 0.5).astype(np.uint8) * 255, "L")
        rows.append({"aoi": f"L15-{i}.x", "before": f"images/t0_{i}.png", "change": f"masks/m_{i}.png",
                     "after": f"images/t1_{i}.png", "past_date": "2019-01", "future_date": "2020-01"})
    rows.append({**rows[0], "aoi": "gone", "after": "images/missing.png"})
    with open(src / "index.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    columns = "id=aoi,past=before,mask=change,future=after"
    with pytest.raises(SourceItemError, match=r"index.csv:5: future images/missing.png: FileNotFoundError"):
        build(str(src / "index.csv"), str(tmp_path / "x"), layout="timeseries-csv", resolution=16, columns=columns,
              progress=False)
    with pytest.raises(ValueError, match="no column past"):
        build(str(src / "index.csv"), str(tmp_path / "x"), layout="timeseries-csv", resolution=16, progress=False)
    res = build(str(src / "index.csv"), str(tmp_path / "set"), layout="timeseries-csv", resolution=16,
                channels="gray", columns=columns, on_error="skip", progress=False)
    assert res.card.modalities == ["image", "cond", "mask", "json"] and res.card.channels == 1
    assert [s["item"] for s in res.skipped] == ["index.csv:5"]
    batch = everything(str(tmp_path / "set"), ("cond", "mask", "image", "json"))
    assert batch["__key__"] == ["L15-0_x", "L15-1_x", "L15-2_x"]
    assert tuple(batch["mask"].shape) == (3, 1, 16, 16)
    assert set(batch["mask"].unique().tolist()) == {0, 255}  # nearest-neighbour: still a binary mask
    assert batch["json"][1]["id"] == "L15-1.x" and batch["json"][1]["past_date"] == "2019-01"
    assert batch["json"][1]["future_date"] == "2020-01" and batch["json"][1]["mask_source"] == "masks/m_1.png"


# --- GeoTIFF -------------------------------------------------------------------------------------

def write_geotiff(path, data, origin=(500000.0, 4000000.0), pixel=10.0, epsg=32633, nodata=0):
    import tifffile

    geokeys = (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, epsg)
    tifffile.imwrite(path, data, photometric="minisblack", planarconfig="contig", extratags=[
        (33550, "d", 3, (pixel, pixel, 0.0), True), (33922, "d", 6, (0, 0, 0, *origin, 0), True),
        (34735, "H", len(geokeys), geokeys, True), (42113, "s", 0, str(nodata), True)])


def test_six_band_geotiff_tiles(tmp_path):
    data = RNG.integers(100, 4000, (40, 50, 6)).astype(np.uint16)
    data[:20, 40:] = 0  # nodata in every band: the top-right tiles go
    write_geotiff(tmp_path / "scene.tif", data)
    res = build(str(tmp_path / "scene.tif"), str(tmp_path / "set"), layout="geotiff", resolution=16, stride=8,
                progress=False)
    # origins 0..24 down, 0..32 across: 4 x 5 = 20 tiles; the 3 at column 32 reaching rows < 20 drop
    assert res.notes == ["3 of 20 tiles dropped as nodata"]
    card = res.card
    assert (card.channels, card.count, card.modalities) == (6, 17, ["image", "json"])
    tar = read_manifest(str(tmp_path / "set")).url[0][len("file://"):]
    assert "scene-r000000-c000000.npy" in tarfile.open(tar).getnames()
    batch = everything(str(tmp_path / "set"), ("image", "json"))
    assert tuple(batch["image"].shape) == (17, 6, 16, 16)
    assert "scene-r000016-c000032" not in batch["__key__"] and "scene-r000024-c000032" in batch["__key__"]
    meta = {k: j for k, j in zip(batch["__key__"], batch["json"])}["scene-r000008-c000016"]
    assert meta["crs"] == "EPSG:32633" and meta["bands"] == 6 and meta["dtype"] == "uint16"
    assert meta["transform"] == [10.0, 0.0, 500000.0 + 16 * 10, 0.0, -10.0, 4000000.0 - 8 * 10]
    lo, hi = np.array(meta["range"])
    tile = data[8:24, 16:32].astype(np.float64)
    expect = np.floor((tile - lo) / (hi - lo) * 255 + 0.5)
    got = batch["image"][list(batch["__key__"]).index("scene-r000008-c000016")].permute(1, 2, 0).numpy()
    assert np.abs(got - expect).max() <= 1  # stretched per band from the raster's valid range

    rgb = build(str(tmp_path / "scene.tif"), str(tmp_path / "rgb"), layout="geotiff", resolution=16, stride=8,
                channels="rgb", progress=False).card
    assert rgb.channels == 3 and rgb.count == 17


def test_shard_size_parsing():
    assert parse_shard_size("1000") == (1000, None)
    assert parse_shard_size(" 256MB ")[1] == 256_000_000
    assert parse_shard_size("1GiB")[1] == 2**30
    for bad in ("0", "12 parsecs", "MB", "-5"):
        with pytest.raises(ValueError, match="shard size"):
            parse_shard_size(bad)


def test_build_refuses_unknown_layout_and_empty_sources(tmp_path):
    with pytest.raises(ValueError, match="unknown layout 'zarr'"):
        build(str(tmp_path), str(tmp_path / "o"), layout="zarr", resolution=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no usable items"):
        build(str(tmp_path / "empty"), str(tmp_path / "o"), layout="folder", resolution=8, progress=False)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        build(str(tmp_path / "nope"), str(tmp_path / "o"), layout="folder", resolution=8, progress=False)
    assert not (tmp_path / "o").exists()
