"""Others read our shards (plain webdataset, Ray Data); shard sets on a real S3 server (moto)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from shard_helpers import crater_keys, write_craters

from data_shards import builtin, storage
from data_shards.card import read_card, read_manifest
from data_shards.sources import Sample
from data_shards.synthetic import crater_field
from data_shards.writer import write_shards


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """A paired set (cond, mask, image, json) and a 6-band .npy set, 3 shards each."""
    root = tmp_path_factory.mktemp("interop")
    pairs = builtin.ensure_builtin("builtin:timeseries?count=10&seed=0", str(root), 16, 3, shard_samples=4)
    rng = np.random.default_rng(0)
    bands = write_shards([Sample(f"tile-{i}", rng.integers(0, 256, (8, 8, 6), np.uint8)) for i in range(7)],
                         str(root / "bands"), layout="geotiff", resolution=8, channels=6, source="test",
                         shard_samples=3, progress=False)
    assert bands.count == 7
    # The common member names: the image is `png` (`npy` beyond 4 bands), pairs add `cond.png` / `mask.png`.
    return {"pairs": (pairs, {"cond.png", "mask.png", "png", "json"}, 10),
            "bands": (storage.to_url(str(root / "bands")), {"npy", "json"}, 7)}


def paths(url):
    return [u[len("file://"):] for u in read_manifest(url).url]


def test_plain_webdataset_reads_our_shards(sets):
    import webdataset as wds

    for url, parts, count in sets.values():
        samples = list(wds.WebDataset(paths(url), shardshuffle=False).decode())  # default: npy, json, cls
        assert len(samples) == count
        assert all({k for k in s if not k.startswith("__")} == parts for s in samples)
    pair = list(wds.WebDataset(paths(sets["pairs"][0]), shardshuffle=False))[0]
    assert Image.open(io.BytesIO(pair["mask.png"])).mode == "L"
    tiles = list(wds.WebDataset(paths(sets["bands"][0]), shardshuffle=False).decode())
    assert tiles[0]["npy"].shape == (8, 8, 6) and tiles[0]["npy"].dtype == np.uint8


@pytest.mark.integration
def test_ray_data_reads_our_shards(ray_local, sets):
    import ray

    for url, parts, count in sets.values():
        rows = ray.data.read_webdataset(paths(url)).take_all()
        assert len(rows) == count
        assert all({k for k in r if not k.startswith("__")} == parts for r in rows)
    rows = ray.data.read_webdataset(paths(sets["pairs"][0])).take_all()
    assert rows[0]["png"].shape == (16, 16, 3) and rows[0]["mask.png"].shape == (16, 16)


@pytest.mark.integration
def test_s3_round_trip(s3_server):
    from data_shards.stream import image_stream, iterate_once
    from data_shards.verify import verify

    url = "s3://orbitgen/tests/data-shards/craters"
    card = write_craters(url, count=40, shard_samples=10, resolution=8)
    assert read_card(url).fingerprint == card.fingerprint
    m = read_manifest(url)
    assert list(m.url) == [f"{url}/shard-{i:06d}.tar" for i in range(4)]
    fs, path = storage.filesystem(url)
    assert not [p for p in fs.ls(path) if ".tmp-" in p]
    assert sum(len(b["__key__"]) for b in iterate_once(url, batch_size=16)) == 40
    assert verify(url).ok
    it = image_stream(url, rank=0, world_size=1, batch_size=4, seed=0, num_workers=2)
    keys = [k for _ in range(10) for k in next(it)["__key__"]]
    assert sorted(keys) == crater_keys(40)
    del it

    # A shard that is gone is named, by the stream and by verify.
    fs.rm(f"{path}/shard-000002.tar")
    with pytest.raises(Exception, match="cannot read shard s3://orbitgen/tests/data-shards/craters/shard-000002.tar"):
        list(iterate_once(url, batch_size=16))
    assert [p.shard for p in verify(url).problems] == ["shard-000002.tar"]

    def failing():
        yield from crater_field(5, 8)
        raise RuntimeError("source broke")

    broken = "s3://orbitgen/tests/data-shards/broken"
    with pytest.raises(RuntimeError, match="source broke"):
        write_shards(failing(), broken, layout="x", resolution=8, channels=1, source="x",
                     shard_samples=2, progress=False)
    fs.invalidate_cache()
    assert not fs.exists(f"{broken[5:]}/manifest.parquet") and not fs.find(broken[5:])

