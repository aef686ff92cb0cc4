"""Writing shard sets: tar shards, card, manifest, publication, encodings, shard sizes, storage URLs."""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import tarfile
from datetime import datetime

import numpy as np
import pytest
from PIL import Image
from shard_helpers import crater_keys, write_craters

from data_shards import storage
from data_shards.card import read_card, read_manifest
from data_shards.decode import decode_sample
from data_shards.shard_reader import read_piece
from data_shards.sources import Sample
from data_shards.synthetic import crater_field
from data_shards.tar_reader import tar_files
from data_shards.writer import write_shards


def test_write_shards_manifest_card_and_plain_webdataset(tmp_path):
    import webdataset as wds

    dest = tmp_path / "set"
    card = write_craters(dest, count=45, shard_samples=10)
    m = read_manifest(str(dest))
    assert list(m.columns) == ["url", "samples", "bytes", "sha256"]
    assert list(m.samples) == [10, 10, 10, 10, 5] and m.samples.sum() == 45
    for row in m.itertuples():
        data = open(row.url[len("file://"):], "rb").read()
        assert hashlib.sha256(data).hexdigest() == row.sha256 and len(data) == row.bytes
    on_disk = json.loads((dest / "dataset.json").read_text())
    assert on_disk == json.loads(card.model_dump_json()) == json.loads(read_card(str(dest)).model_dump_json())
    assert (card.layout, card.modalities, card.resolution, card.channels, card.count, card.shards) == \
        ("synthetic:craters", ["image", "json"], 16, 1, 45, 5)
    assert (card.classes, card.skipped) == (None, 0)
    assert card.fingerprint == hashlib.sha256("".join(m.sha256).encode()).hexdigest()
    assert card.builder.startswith("orbitgen ") and datetime.fromisoformat(card.created)
    assert not glob.glob(str(dest / ".tmp-*")) and not (dest / "skipped.jsonl").exists()

    # A plain WebDataset reads the same samples, gray PNGs stay gray.
    samples = list(wds.WebDataset(sorted(glob.glob(str(dest / "*.tar"))), shardshuffle=False))
    assert [s["__key__"] for s in samples] == crater_keys(45)
    img = Image.open(io.BytesIO(samples[3]["png"]))   # the common member name
    assert img.mode == "L" and img.size == (16, 16)
    assert json.loads(samples[3]["json"])["index"] == 3


def test_rewrite_same_content_is_a_no_op_and_other_content_is_refused(tmp_path):
    dest = tmp_path / "set"
    first = write_craters(dest, count=12, shard_samples=5)
    again = write_craters(dest, count=12, shard_samples=5)   # same bytes: tar mtime fixed, PNG deterministic
    assert again.fingerprint == first.fingerprint and again.created == first.created
    other_name = write_shards(crater_field(12, 16), str(dest), layout="synthetic:craters", resolution=16,
                              channels=1, source="spelled differently", shard_samples=5, progress=False)
    assert other_name == first  # content decides, not how the source was named
    with pytest.raises(FileExistsError, match="set"):
        write_craters(dest, count=12, shard_samples=5, seed=1)  # same card fields, other content
    with pytest.raises(FileExistsError, match="set"):
        write_craters(dest, count=12, shard_samples=5, resolution=8)
    assert read_card(str(dest)).fingerprint == first.fingerprint
    assert not glob.glob(str(dest / ".tmp-*"))


def test_failure_mid_write_leaves_nothing(tmp_path):
    def failing():
        for i, s in enumerate(crater_field(20, 16)):
            if i == 7:
                raise RuntimeError("source broke")
            yield s

    dest = tmp_path / "set"
    with pytest.raises(RuntimeError, match="source broke"):
        write_shards(failing(), str(dest), layout="x", resolution=16, channels=1, source="x",
                     shard_samples=3, skipped=[{"item": "a", "reason": "b"}], progress=False)
    left = os.listdir(dest) if dest.exists() else []
    assert left == []  # no shard, no card, no report, no temporary prefix
    with pytest.raises(FileNotFoundError, match="not an orbitgen shard set"):
        read_manifest(str(dest))


def test_writer_rejects_bad_samples(tmp_path):
    img = np.zeros((8, 8, 1), np.uint8)
    cases = [("first dot", [Sample("a.b", img)], 1), ("duplicate", [Sample("a", img), Sample("a", img)], 1),
             ("image is uint8", [Sample("a", img)], 3),
             ("cond is uint8", [Sample("a", img, cond=np.zeros((8, 8, 3), np.uint8))], 1),
             ("mask is uint16", [Sample("a", img, mask=img.astype(np.uint16))], 1),
             ("parts", [Sample("a", img), Sample("b", img, cls=1)], 1)]
    for i, (match, samples, channels) in enumerate(cases):
        with pytest.raises(ValueError, match=match):
            write_shards(samples, str(tmp_path / str(i)), layout="x", resolution=8, channels=channels,
                         source="x", progress=False)
    assert not glob.glob(str(tmp_path / "*" / "*"))


def test_band_counts_are_stored_losslessly(tmp_path):
    """PNG holds 1-4 bands (L, LA, RGB, RGBA); more bands go to .npy; all decode to the same bytes."""
    rng = np.random.default_rng(0)
    for bands, ext in ((1, "png"), (2, "png"), (3, "png"), (4, "png"), (6, "npy")):
        images = [rng.integers(0, 256, (8, 8, bands), np.uint8) for _ in range(3)]
        dest = tmp_path / f"b{bands}"
        card = write_shards([Sample(f"s{i}", a, cond=a[::-1].copy(), mask=a[:, :, :1]) for i, a in enumerate(images)],
                            str(dest), layout="x", resolution=8, channels=bands, source="x", progress=False)
        assert card.modalities == ["image", "cond", "mask", "json"]
        raws = list(read_piece(read_manifest(str(dest)).url[0]))
        assert {k for k in raws[0] if not k.startswith("__")} == {ext, f"cond.{ext}", "mask.png", "json"}
        for raw, a in zip(raws, images):
            s = decode_sample(raw, ("image", "cond", "mask"))
            assert s["image"].shape == (8, 8, bands) and (s["image"] == a).all()
            assert (s["cond"] == a[::-1]).all() and (s["mask"] == a[:, :, :1]).all()


def test_shard_size_by_bytes(tmp_path):
    rng = np.random.default_rng(0)
    noise = [Sample(f"n{i}", rng.integers(0, 256, (32, 32, 3), np.uint8)) for i in range(20)]  # ~3 KiB PNGs
    card = write_shards(noise, str(tmp_path / "s"), layout="x", resolution=32, channels=3, source="x",
                        shard_bytes=10_000, progress=False)
    m = read_manifest(str(tmp_path / "s"))
    assert card.count == 20 and len(m) > 3 and m.samples.sum() == 20
    # A shard closes once it reaches the size: all but the last are at least that big, and one
    # sample (~3.6 KiB with its tar headers) plus tar's 10 KiB record over it at most.
    assert all(10_000 <= b <= 10_000 + 4_000 + 10_240 for b in m.bytes[:-1])


def test_read_card_names_the_url(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        read_card(str(tmp_path))
    assert str(tmp_path) in str(e.value) and "orbitgen data build" in str(e.value)


def test_storage_urls(monkeypatch, tmp_path):
    assert storage.to_url("rel/x") == "file://" + os.path.abspath("rel/x")
    assert storage.to_url("s3://b/k") == "s3://b/k"
    assert storage.join("s3://b/k/", "x", "/y.tar") == "s3://b/k/x/y.tar"
    assert storage.is_local("/x") and storage.is_local("file:///x") and not storage.is_local("s3://b/x")
    fs, path = storage.filesystem(storage.to_url(str(tmp_path)))
    assert path == str(tmp_path) and "file" in fs.protocol
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    fs, path = storage.filesystem("s3://bucket/some/set")
    assert path == "bucket/some/set" and fs.client_kwargs == {"endpoint_url": "http://127.0.0.1:1"}
    storage.register_webdataset_schemes()
    from webdataset.gopen import gopen_schemes
    assert gopen_schemes["s3"] is storage._gopen_fsspec


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_reads_what_tarfile_writes(tmp_path, fmt):
    files = {"a.png": b"x" * 700, "d" * 60 + "/" + "n" * 80 + ".json": b"{}", "p" * 90 + "/" + "q" * 90 + ".cls": b"3",
             "empty.txt": b"", "\u00e9t\u00e9.json": b"[]"}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        d = tarfile.TarInfo("somedir")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        link = tarfile.TarInfo("link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "a.png"
        tar.addfile(link)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    assert dict(tar_files(io.BytesIO(data))) == files
    with pytest.raises(tarfile.ReadError, match="unexpected end"):
        list(tar_files(io.BytesIO(data[:2000])))
    bad = bytearray(data)
    bad[1030] ^= 0x01  # inside the second header's name
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(tar_files(io.BytesIO(bytes(bad))))
