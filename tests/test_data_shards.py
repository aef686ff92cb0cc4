"""The data plane: synthetic source, folder source, shard writer, card/manifest, streams, built-ins.

Unit tests use tiny images in tmp folders; the one marked `integration` goes through a real S3
HTTP server (moto).
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
from collections import Counter
from datetime import datetime

import numpy as np
import pytest
from PIL import Image

from data_shards import builtin, storage
from data_shards.card import read_card, read_manifest
from data_shards.preview import describe, image_grid, save_preview
from data_shards.sources import Sample, read_folder
from data_shards.synthetic import crater_field
from data_shards.writer import write_shards


def build(dest, count=40, shard_samples=10, resolution=16, channels=1, seed=0, **kw):
    return write_shards(crater_field(count, resolution, channels, seed), str(dest), layout="synthetic:craters",
                        resolution=resolution, channels=channels, source=f"test seed={seed}",
                        shard_samples=shard_samples, progress=False, **kw)


def first_epoch_keys(url, world_size, num_workers, batch_size, batches_per_rank):
    import torch

    from data_shards.stream import image_stream

    keys = {}
    for rank in range(world_size):
        it = image_stream(url, rank=rank, world_size=world_size, batch_size=batch_size, seed=7,
                          shuffle_buffer=16, num_workers=num_workers)
        keys[rank] = []
        for _ in range(batches_per_rank[rank]):
            b = next(it)
            assert b["image"].dtype == torch.uint8
            assert tuple(b["image"].shape) == (batch_size, 1, 8, 8)
            keys[rank] += b["__key__"]
        del it
    return keys


# --- synthetic -------------------------------------------------------------------------------

def test_crater_field_is_deterministic_per_image():
    a = [s.image.tobytes() for s in crater_field(5, 32, seed=3)]
    b = [s.image.tobytes() for s in crater_field(300, 32, seed=3)][:5]  # rendered in other chunks
    c = [s.image.tobytes() for s in crater_field(5, 32, seed=4)]
    assert a == b
    assert all(x != y for x, y in zip(a, c))
    assert len(set(a)) == 5
    s = next(crater_field(1, 32, channels=3, seed=3))
    assert s.key == "crater-000000" and s.image.shape == (32, 32, 3) and s.image.dtype == np.uint8
    assert s.image.std() > 5  # not a flat image


# --- writer, card, manifest --------------------------------------------------------------------

def test_write_shards_manifest_card_and_plain_webdataset(tmp_path):
    import webdataset as wds

    dest = tmp_path / "set"
    card = build(dest, count=45, shard_samples=10)
    m = read_manifest(str(dest))
    assert list(m.columns) == ["url", "samples", "bytes", "sha256"]
    assert list(m.samples) == [10, 10, 10, 10, 5] and m.samples.sum() == 45
    for row in m.itertuples():
        data = open(row.url[len("file://"):], "rb").read()
        assert hashlib.sha256(data).hexdigest() == row.sha256 and len(data) == row.bytes
    on_disk = json.loads((dest / "dataset.json").read_text())
    assert on_disk == json.loads(card.model_dump_json()) == json.loads(read_card(str(dest)).model_dump_json())
    assert (card.layout, card.modalities, card.resolution, card.channels, card.count, card.shards) == \
        ("synthetic:craters", ["image"], 16, 1, 45, 5)
    assert card.fingerprint == hashlib.sha256("".join(m.sha256).encode()).hexdigest()
    assert card.builder.startswith("orbitgen ") and datetime.fromisoformat(card.created)
    assert not glob.glob(str(dest / ".tmp-*"))

    # A plain WebDataset reads the same samples, gray PNGs stay gray.
    samples = list(wds.WebDataset(sorted(glob.glob(str(dest / "*.tar"))), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"crater-{i:06d}" for i in range(45)]
    img = Image.open(io.BytesIO(samples[3]["image.png"]))
    assert img.mode == "L" and img.size == (16, 16)
    assert json.loads(samples[3]["json"])["index"] == 3


def test_rewrite_same_content_is_a_no_op_and_other_content_is_refused(tmp_path):
    dest = tmp_path / "set"
    first = build(dest, count=12, shard_samples=5)
    again = build(dest, count=12, shard_samples=5)   # same bytes: tar mtime fixed, PNG deterministic
    assert again.fingerprint == first.fingerprint and again.created == first.created
    other_name = write_shards(crater_field(12, 16), str(dest), layout="synthetic:craters", resolution=16,
                              channels=1, source="spelled differently", shard_samples=5, progress=False)
    assert other_name == first  # content decides, not how the source was named
    with pytest.raises(FileExistsError, match="set"):
        build(dest, count=12, shard_samples=5, seed=1)  # same card fields, other content
    with pytest.raises(FileExistsError, match="set"):
        build(dest, count=12, shard_samples=5, resolution=8)
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
                     shard_samples=3, progress=False)
    left = os.listdir(dest) if dest.exists() else []
    assert "manifest.parquet" not in left and not [n for n in left if n.startswith(".tmp-")]
    assert not [n for n in left if n.endswith(".tar")]
    with pytest.raises(FileNotFoundError, match="not an orbitgen shard set"):
        read_manifest(str(dest))


def test_writer_rejects_bad_samples(tmp_path):
    img = np.zeros((8, 8, 1), np.uint8)
    with pytest.raises(ValueError, match="first dot"):
        write_shards([Sample("a.b", img)], str(tmp_path / "a"), layout="x", resolution=8, channels=1,
                     source="x", progress=False)
    with pytest.raises(ValueError, match="duplicate"):
        write_shards([Sample("a", img), Sample("a", img)], str(tmp_path / "b"), layout="x", resolution=8,
                     channels=1, source="x", progress=False)
    with pytest.raises(ValueError, match="shape"):
        write_shards([Sample("a", img)], str(tmp_path / "c"), layout="x", resolution=8, channels=3,
                     source="x", progress=False)
    assert not glob.glob(str(tmp_path / "*" / "*"))


def test_read_card_names_the_url(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        read_card(str(tmp_path))
    assert str(tmp_path) in str(e.value) and "orbitgen data build" in str(e.value)


# --- folder source -------------------------------------------------------------------------------

def test_read_folder_resizes_converts_and_names(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (30, 40), np.uint8), "L").save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 255, (80, 50, 3), np.uint8)).save(tmp_path / "sub" / "b.jpg")
    Image.fromarray(rng.integers(0, 255, (20, 20, 4), np.uint8), "RGBA").save(tmp_path / "sub" / "c.v2.png")
    Image.fromarray(rng.integers(0, 65535, (33, 33), np.uint16)).save(tmp_path / "sub" / "deeper" / "d.tif")
    (tmp_path / "notes.txt").write_text("not an image")

    by_channels = {ch: list(read_folder(str(tmp_path), 24, ch)) for ch in (1, 3, None)}
    keys = [s.key for s in by_channels[1]]
    assert keys == ["a", "sub_b", "sub_c_v2", "sub_deeper_d"]
    assert [s.meta["source"] for s in by_channels[1]] == ["a.png", "sub/b.jpg", "sub/c.v2.png", "sub/deeper/d.tif"]
    for ch, want in ((1, [1, 1, 1, 1]), (3, [3, 3, 3, 3]), (None, [1, 3, 3, 1])):
        assert [s.image.shape for s in by_channels[ch]] == [(24, 24, c) for c in want]
        assert all(s.image.dtype == np.uint8 for s in by_channels[ch])
    assert by_channels[1][3].image.std() > 20  # 16-bit data scaled, not clipped to white

    (tmp_path / "sub" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match="broken.png"):
        list(read_folder(str(tmp_path), 24, 1))


# --- streams -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def eight_shards(tmp_path_factory):
    dest = tmp_path_factory.mktemp("eight") / "set"
    build(dest, count=64, shard_samples=8, resolution=8)
    return str(dest)


def test_stream_epoch_covers_every_sample_once_across_ranks(eight_shards):
    # 8 shards, 2 ranks x 2 workers: 2 shards = 16 samples = 4 batches of 4 per worker.
    keys = first_epoch_keys(eight_shards, 2, 2, 4, {0: 8, 1: 8})
    union = Counter(keys[0] + keys[1])
    assert set(union) == {f"crater-{i:06d}" for i in range(64)} and set(union.values()) == {1}
    assert keys[0] != sorted(keys[0])  # shuffled


def test_stream_repeats_epochs_with_a_new_order(eight_shards):
    from data_shards.stream import image_stream

    it = image_stream(eight_shards, rank=0, world_size=1, batch_size=8, seed=1, num_workers=1)
    epochs = [sum((next(it)["__key__"] for _ in range(8)), []) for _ in range(3)]
    assert all(sorted(e) == [f"crater-{i:06d}" for i in range(64)] for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]


def test_stream_with_fewer_shards_than_readers(tmp_path):
    # 3 shards < 2 ranks x 2 workers: ranks split shards, workers split samples.
    dest = tmp_path / "three"
    build(dest, count=24, shard_samples=8, resolution=8)
    keys = first_epoch_keys(str(dest), 2, 2, 4, {0: 4, 1: 2})
    union = Counter(keys[0] + keys[1])
    assert len(union) == 24 and set(union.values()) == {1}

    # 1 shard < 2 ranks: every rank still gets data, disjoint.
    dest = tmp_path / "one"
    build(dest, count=10, shard_samples=10, resolution=8)
    keys = first_epoch_keys(str(dest), 2, 2, 2, {0: 2, 1: 2})
    assert keys[0] and keys[1] and not set(keys[0]) & set(keys[1])

    # As many samples as ranks: each rank gets its own one, forever.
    dest = tmp_path / "tiny"
    build(dest, count=3, shard_samples=10, resolution=8)
    keys = first_epoch_keys(str(dest), 3, 2, 1, {0: 3, 1: 3, 2: 3})
    assert [set(keys[r]) for r in range(3)] == [{f"crater-{r:06d}"} for r in range(3)]


@pytest.fixture()
def corrupt_set(tmp_path):
    """A set of 2 shards whose first shard has garbage as sample 2's image and whose second is cut."""
    import webdataset as wds

    dest = tmp_path / "set"
    build(dest, count=12, shard_samples=6, resolution=8)
    shard0, shard1 = sorted(glob.glob(str(dest / "*.tar")))
    good = list(wds.WebDataset(shard0, shardshuffle=False))
    with wds.TarWriter(shard0, encoder=False) as tar:
        for s in good:
            rec = {k: v for k, v in s.items() if k in ("__key__", "image.png", "json")}
            if s["__key__"] == "crater-000002":
                rec["image.png"] = b"\x89PNG\r\n\x1a\n this is not an image"
            tar.write(rec)
    data = open(shard1, "rb").read()
    open(shard1, "wb").write(data[: len(data) // 2 + 100])  # truncated mid-way
    return str(dest)


def test_corrupt_samples_are_skipped(corrupt_set, caplog):
    from data_shards.stream import image_stream, iterate_once

    with caplog.at_level(logging.WARNING, logger="data_shards.stream"):
        keys = sum((b["__key__"] for b in iterate_once(corrupt_set, batch_size=4)), [])
    assert keys[:5] == ["crater-000000", "crater-000001", "crater-000003", "crater-000004", "crater-000005"]
    assert 6 < len(keys) < 11 and "crater-000002" not in keys
    assert "crater-000002" in caplog.text

    it = image_stream(corrupt_set, rank=0, world_size=1, batch_size=4, seed=0, num_workers=1)
    seen = sum((next(it)["__key__"] for _ in range(6)), [])  # > 2 epochs of what is readable
    assert "crater-000002" not in seen and set(keys) == set(seen)


def test_iterate_once_order_and_limit(eight_shards):
    from data_shards.stream import iterate_once

    batches = list(iterate_once(eight_shards, batch_size=5, limit=12))
    assert [len(b["__key__"]) for b in batches] == [5, 5, 2]
    assert sum((b["__key__"] for b in batches), []) == [f"crater-{i:06d}" for i in range(12)]
    assert tuple(batches[0]["image"].shape) == (5, 1, 8, 8)


# --- built-ins, preview, storage -----------------------------------------------------------

def test_builtin_is_built_once(tmp_path, monkeypatch):
    url = "builtin:craters?count=20&seed=2"
    assert builtin.is_builtin(url) and not builtin.is_builtin(str(tmp_path))
    first = builtin.ensure_builtin(url, str(tmp_path), 16, 3, shard_samples=8)
    assert first == f"file://{tmp_path}/craters-n20-s2-r16-c3"
    card = read_card(first)
    assert (card.count, card.channels, card.shards, card.layout) == (20, 3, 3, "synthetic:craters")

    def no_rebuild(*a, **k):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(builtin, "write_shards", no_rebuild)
    assert builtin.ensure_builtin(url, str(tmp_path), 16, 3, shard_samples=8) == first
    for bad in ("builtin:moons", "builtin:craters?cnt=5", "builtin:craters?count=x"):
        with pytest.raises(ValueError, match="allowed: builtin:craters"):
            builtin.ensure_builtin(bad, str(tmp_path), 16, 3)


def test_preview(tmp_path, eight_shards):
    grid = image_grid(np.full((5, 4, 6, 3), 200, np.uint8), nrow=2, pad=1)
    assert grid.shape == (3 * 5 + 1, 2 * 7 + 1, 3) and grid[0, 0, 0] == 0 and grid[1, 1, 0] == 200
    text = describe(eight_shards)
    assert "shard-000007.tar" in text and "64 samples in 8 shards" in text
    out = save_preview(eight_shards, str(tmp_path / "p.png"), n=9)
    img = Image.open(out)
    assert img.mode == "L" and img.size == (3 * 10 + 2, 3 * 10 + 2)


def test_storage_urls(monkeypatch, tmp_path):
    assert storage.to_url("rel/x") == "file://" + os.path.abspath("rel/x")
    assert storage.to_url("s3://b/k") == "s3://b/k"
    assert storage.join("s3://b/k/", "x", "/y.tar") == "s3://b/k/x/y.tar"
    fs, path = storage.filesystem(storage.to_url(str(tmp_path)))
    assert path == str(tmp_path) and "file" in fs.protocol
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    fs, path = storage.filesystem("s3://bucket/some/set")
    assert path == "bucket/some/set" and fs.client_kwargs == {"endpoint_url": "http://127.0.0.1:1"}
    storage.register_webdataset_schemes()
    from webdataset.gopen import gopen_schemes
    assert gopen_schemes["s3"] is storage._gopen_fsspec


@pytest.mark.integration
def test_s3_round_trip(s3_server):
    from data_shards.stream import image_stream, iterate_once

    url = "s3://orbitgen/tests/data-shards/craters"
    card = write_shards(crater_field(40, 8), url, layout="synthetic:craters", resolution=8, channels=1,
                        source="test", shard_samples=10, progress=False)
    assert read_card(url).fingerprint == card.fingerprint
    m = read_manifest(url)
    assert list(m.url) == [f"{url}/shard-{i:06d}.tar" for i in range(4)]
    fs, path = storage.filesystem(url)
    assert not [p for p in fs.ls(path) if ".tmp-" in p]
    assert sum(len(b["__key__"]) for b in iterate_once(url, batch_size=16)) == 40
    it = image_stream(url, rank=0, world_size=1, batch_size=4, seed=0, num_workers=2)
    keys = sum((next(it)["__key__"] for _ in range(10)), [])
    assert sorted(keys) == [f"crater-{i:06d}" for i in range(40)]
    del it

    def failing():
        yield from crater_field(5, 8)
        raise RuntimeError("source broke")

    broken = "s3://orbitgen/tests/data-shards/broken"
    with pytest.raises(RuntimeError, match="source broke"):
        write_shards(failing(), broken, layout="x", resolution=8, channels=1, source="x",
                     shard_samples=2, progress=False)
    fs.invalidate_cache()
    assert not fs.exists(f"{broken[5:]}/manifest.parquet") and not fs.find(broken[5:])
