"""The training stream: shares per rank and worker, epochs, resume, corrupt data; the ordered pass."""
from __future__ import annotations

import glob
import logging
import os
from collections import Counter

import pytest
import torch
from shard_helpers import crater_keys, stream_keys, write_craters

from data_shards import builtin, stream
from data_shards.stream import epoch_pieces, image_stream, iterate_once, turns


def flat(batches):
    return [k for b in batches for k in b]


@pytest.mark.parametrize("counts, world, workers, batch", [
    ([9] * 7 + [1], 2, 2, 4), ([10, 10, 10, 10, 5], 2, 2, 4), ([100], 2, 2, 3), ([3, 1, 4, 1, 5, 9, 2, 6], 3, 2, 2),
    ([5, 5], 1, 3, 2), ([8] * 8, 4, 1, 8)])
def test_epoch_pieces_split_every_epoch_into_disjoint_equal_shares(counts, world, workers, batch):
    per_epoch = sum(counts) // (world * batch)
    for epoch in range(3):
        seen, per_rank = Counter(), Counter()
        for rank in range(world):
            for worker in range(workers):
                pieces = epoch_pieces(counts, epoch, 5, rank, world, worker, workers, batch)
                n = sum(hi - lo for _, lo, hi in pieces)
                assert n == turns(worker, workers, epoch * per_epoch, (epoch + 1) * per_epoch) * batch
                per_rank[rank] += n
                seen.update((s, i) for s, lo, hi in pieces for i in range(lo, hi))
        assert set(per_rank.values()) == {per_epoch * batch}  # every rank the same number of batches
        assert set(seen.values()) == {1} and len(seen) == world * per_epoch * batch  # disjoint
        assert all(0 <= i < counts[s] for s, i in seen)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """64 samples in 8 shards of unequal size (7 x 9 + 1)."""
    dest = tmp_path_factory.mktemp("uneven") / "set"
    write_craters(dest, count=64, shard_samples=9, resolution=8)
    return str(dest)


def test_two_ranks_two_workers_cover_every_sample_once_per_epoch(uneven):
    # 64 samples, 2 ranks x batch 4: 8 batches per rank per epoch; read 2 epochs.
    keys = stream_keys(uneven, world_size=2, num_workers=2, batch_size=4, batches=16)
    epochs = []
    for e in range(2):
        per_rank = [flat(keys[r][e * 8:(e + 1) * 8]) for r in range(2)]
        union = Counter(per_rank[0] + per_rank[1])
        assert set(union) == set(crater_keys(64)) and set(union.values()) == {1}
        epochs.append(per_rank[0])
    assert epochs[0] != sorted(epochs[0])  # shuffled
    assert set(epochs[0]) != set(epochs[1])  # a new split each epoch


def test_stream_batches_and_dtypes(uneven):
    it = image_stream(uneven, rank=0, world_size=1, batch_size=5, seed=1, num_workers=0)
    b = next(it)
    assert b["image"].dtype == torch.uint8 and tuple(b["image"].shape) == (5, 1, 8, 8)
    assert set(b) == {"__key__", "image"}
    # 64 samples, batch 5: 12 batches an epoch, the 4 left over wait for a later epoch
    epoch = flat(b["__key__"] for b in [b] + [next(it) for _ in range(11)])
    assert len(set(epoch)) == 60


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("holdout", [None, 0.2])
def test_resume_yields_what_an_uninterrupted_stream_would(uneven, workers, holdout):
    kw = dict(rank=1, world_size=2, batch_size=4, seed=3, num_workers=workers, shuffle_buffer=8, holdout=holdout)
    it = image_stream(uneven, **kw)
    whole = [next(it)["__key__"] for _ in range(20)]  # 2.5 epochs (without a holdout)
    del it
    per_epoch = stream.batches_per_epoch(uneven, 2, 4, holdout=holdout)
    for start in (3, per_epoch, per_epoch + 5):
        it = image_stream(uneven, start_batch=start, **kw)
        assert [next(it)["__key__"] for _ in range(20 - start)] == whole[start:], start
        del it


def test_fewer_shards_than_readers(tmp_path):
    dest = tmp_path / "one"
    write_craters(dest, count=10, shard_samples=10, resolution=8)
    keys = stream_keys(str(dest), world_size=2, num_workers=2, batch_size=2, batches=2)
    assert len(flat(keys[0])) == len(flat(keys[1])) == 4  # 10 // (2 x 2) = 2 batches each
    assert not set(flat(keys[0])) & set(flat(keys[1]))


def test_pair_keys_are_collated(tmp_path):
    url = builtin.ensure_builtin("builtin:timeseries?count=12&seed=0", str(tmp_path), 16, 3)
    b = next(image_stream(url, rank=0, world_size=1, batch_size=4, seed=0, num_workers=0,
                          keys=("cond", "mask", "image", "json")))
    assert tuple(b["cond"].shape) == tuple(b["image"].shape) == (4, 3, 16, 16)
    assert tuple(b["mask"].shape) == (4, 1, 16, 16) and b["mask"].dtype == torch.uint8
    assert [j["id"] for j in b["json"]] == b["__key__"]
    url = builtin.ensure_builtin("builtin:terrain-classes?count=10&seed=0", str(tmp_path), 16, 1)
    b = next(image_stream(url, rank=0, world_size=1, batch_size=4, seed=0, num_workers=0, keys=("image", "cls")))
    assert b["cls"].dtype == torch.int64 and b["cls"].shape == (4,)


def test_stream_refuses_what_it_cannot_serve(uneven):
    with pytest.raises(ValueError, match="64 samples cannot fill a batch of 40 on each of 2 ranks"):
        image_stream(uneven, rank=0, world_size=2, batch_size=40, seed=0)
    with pytest.raises(ValueError, match="has no cond"):
        image_stream(uneven, rank=0, world_size=1, batch_size=4, seed=0, keys=("cond", "image"))
    with pytest.raises(ValueError, match="outside world_size"):
        image_stream(uneven, rank=2, world_size=2, batch_size=4, seed=0)


@pytest.fixture()
def corrupt_set(tmp_path):
    """2 shards of 6: shard 0 has garbage as sample 2's image, shard 1 is cut in the middle."""
    import webdataset as wds

    dest = tmp_path / "set"
    write_craters(dest, count=12, shard_samples=6, resolution=8)
    shard0, shard1 = sorted(glob.glob(str(dest / "*.tar")))
    good = list(wds.WebDataset(shard0, shardshuffle=False))
    with wds.TarWriter(shard0, encoder=False) as tar:
        for s in good:
            rec = {k: v for k, v in s.items() if k in ("__key__", "png", "json")}
            if s["__key__"] == "crater-000002":
                rec["png"] = b"\x89PNG\r\n\x1a\n this is not an image"
            tar.write(rec)
    data = open(shard1, "rb").read()
    open(shard1, "wb").write(data[: len(data) // 2 + 100])  # truncated mid-way
    return str(dest)


def test_corrupt_samples_are_skipped_counted_and_replaced(corrupt_set, caplog):
    with caplog.at_level(logging.WARNING, logger="data_shards"):
        keys = flat(b["__key__"] for b in iterate_once(corrupt_set, batch_size=4))
    assert keys[:5] == ["crater-000000", "crater-000001", "crater-000003", "crater-000004", "crater-000005"]
    assert 6 < len(keys) < 11 and "crater-000002" not in keys
    assert "crater-000002" in caplog.text and "samples missing" in caplog.text

    before = stream.skipped()
    it = image_stream(corrupt_set, rank=0, world_size=1, batch_size=4, seed=0, num_workers=2)
    batches = [next(it)["__key__"] for _ in range(9)]  # 3 epochs of 3 full batches
    assert all(len(b) == 4 for b in batches)
    assert "crater-000002" not in flat(batches) and set(flat(batches)) == set(keys)
    # the workers' counts reach this process with the batches: 12 - len(keys) per epoch, 3 epochs
    # (less whatever the last batches' workers had not reported yet)
    assert stream.skipped() - before >= 2 * (12 - len(keys))
    del it

    # resuming over corrupt data lands on the same batches
    it = image_stream(corrupt_set, rank=0, world_size=1, batch_size=4, seed=0, num_workers=2, start_batch=4)
    assert [next(it)["__key__"] for _ in range(5)] == batches[4:]


def test_a_set_with_nothing_readable_stops_the_stream(tmp_path):
    import webdataset as wds

    dest = tmp_path / "set"
    write_craters(dest, count=8, shard_samples=4, resolution=8)
    for shard in glob.glob(str(dest / "*.tar")):
        samples = list(wds.WebDataset(shard, shardshuffle=False))
        with wds.TarWriter(shard, encoder=False) as tar:
            for s in samples:
                tar.write({"__key__": s["__key__"], "image.png": b"garbage", "json": s["json"]})
    it = image_stream(str(dest), rank=0, world_size=1, batch_size=2, seed=0, num_workers=0)
    with pytest.raises(RuntimeError, match="no readable sample in its shares of 3 epochs in a row"):
        next(it)


def test_an_unreadable_shard_is_named(tmp_path):
    dest = tmp_path / "set"
    write_craters(dest, count=12, shard_samples=6, resolution=8)
    os.remove(dest / "shard-000001.tar")
    with pytest.raises(Exception, match="cannot read shard .*shard-000001.tar"):
        list(iterate_once(str(dest), batch_size=4))
    it = image_stream(str(dest), rank=0, world_size=1, batch_size=4, seed=0, num_workers=1)
    with pytest.raises(Exception, match="shard-000001.tar"):
        for _ in range(3):
            next(it)
    (dest / "shard-000000.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(Exception, match="cannot read shard .*shard-000000.tar"):
        list(iterate_once(str(dest), batch_size=4))


def test_iterate_once_order_and_limit(uneven):
    batches = list(iterate_once(uneven, batch_size=5, limit=12))
    assert [len(b["__key__"]) for b in batches] == [5, 5, 2]
    assert flat(b["__key__"] for b in batches) == crater_keys(12)
    assert tuple(batches[0]["image"].shape) == (5, 1, 8, 8)
