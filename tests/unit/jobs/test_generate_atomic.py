"""`models generate --overwrite` publishes the new set before the old one goes: a failure while
generating or while publishing leaves the old set whole (it verifies), never neither. Ray's actors
are replaced by a function that writes the same one-shard parts (the Ray runs are in
tests/integration/test_generate.py)."""
from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem

import models.snapshot
from data_shards.card import CARD, read_card, read_manifest
from data_shards.errors import InputExists
from data_shards.sources import Sample
from data_shards.storage import join
from data_shards.verify import verify
from data_shards.writer import write_shards
from jobs import generate as gen

FAMILY = SimpleNamespace(name="fake", conditional=False, resolution=16, channels=1, data_keys=("image",))


def tree(folder) -> dict[str, bytes]:
    out = {}
    for dirpath, _, filenames in os.walk(folder):
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, folder)] = open(p, "rb").read()
    return out


def fake_workers(fail_after: int | None = None):
    """`_write_shards` as the actors do it (one-shard sets under `tmp`); raises after `fail_after` shards."""
    def write(model, ranges, seed_base, tmp, workers, inputs, progress, **resources):
        rows = []
        for index, (lo, hi) in enumerate(ranges):
            if fail_after is not None and index == fail_after:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            samples = (Sample(key=f"seed{s:010d}", image=np.full((16, 16, 1), s % 256, np.uint8), meta={"seed": s})
                       for s in range(seed_base + lo, seed_base + hi))
            part = join(tmp, f"part-{index:06d}")
            card = write_shards(samples, part, layout="generated", resolution=16, channels=1, source="generated",
                                shard_samples=hi - lo, progress=False)
            row = read_manifest(part).iloc[0]
            rows.append({"index": index, "shard": row["url"], "samples": int(row["samples"]),
                         "bytes": int(row["bytes"]), "sha256": row["sha256"], "modalities": card.modalities})
        return rows
    return write


@pytest.fixture
def old_set(tmp_path, monkeypatch):
    monkeypatch.setattr(models.snapshot, "load_snapshot", lambda snapshot: (FAMILY, None, None))
    monkeypatch.setattr(gen, "_write_shards", fake_workers())
    out = tmp_path / "out"
    gen.generate(gen.ModelSource("old.pt", "old.pt"), 8, str(out), shard_size=4, progress=False, say=lambda m: None)
    assert verify(str(out)).ok
    return out


def _generate_new(out, overwrite=True):
    return gen.generate(gen.ModelSource("new.pt", "new.pt"), 12, str(out), seed_base=100, shard_size=4,
                        overwrite=overwrite, progress=False, say=lambda m: None)


def test_a_model_that_fails_mid_generation_leaves_the_old_set(old_set, monkeypatch):
    before = tree(old_set)
    monkeypatch.setattr(gen, "_write_shards", fake_workers(fail_after=1))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        _generate_new(old_set)
    assert tree(old_set) == before and verify(str(old_set)).ok


def test_a_destination_that_fails_while_publishing_leaves_the_old_set(old_set, monkeypatch):
    """The old command removed the old set, then moved the new one in: a failure there left neither."""
    before = tree(old_set)
    real_mv = LocalFileSystem.mv

    def mv(self, src, dst, **kw):
        if dst.endswith("/out/shard-000001.tar") and gen.BACKUP not in src:   # the new set's 2nd shard, going in
            raise PermissionError(13, "Permission denied", dst)
        return real_mv(self, src, dst, **kw)

    monkeypatch.setattr(LocalFileSystem, "mv", mv)
    with pytest.raises(PermissionError):
        _generate_new(old_set)
    assert tree(old_set) == before and verify(str(old_set)).ok
    assert read_card(str(old_set)).source == "old.pt"


def test_overwrite_replaces_the_set_and_leaves_nothing_else(old_set):
    result = _generate_new(old_set)
    assert result.card.count == 12 and read_card(str(old_set)).source == "new.pt" and verify(str(old_set)).ok
    assert sorted(tree(old_set)) == [CARD, "manifest.parquet", "shard-000000.tar", "shard-000001.tar",
                                     "shard-000002.tar"]


def test_without_overwrite_an_existing_set_is_refused_and_kept(old_set):
    before = tree(old_set)
    with pytest.raises(InputExists, match="--overwrite"):
        _generate_new(old_set, overwrite=False)
    assert tree(old_set) == before
