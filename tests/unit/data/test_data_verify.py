"""Checking a set (verify) and looking at it (describe, preview grid)."""
from __future__ import annotations

import tarfile

import numpy as np
from PIL import Image
from shard_helpers import write_craters

from data_shards import builtin
from data_shards.card import read_manifest
from data_shards.preview import describe, image_grid, save_preview
from data_shards.verify import verify


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verify_passes_a_good_set_and_names_a_flipped_byte(tmp_path):
    dest = tmp_path / "set"
    write_craters(dest, count=12, shard_samples=4, resolution=8)
    report = verify(str(dest))
    assert report.ok and (report.shards, report.samples) == (3, 12)

    shard = dest / "shard-000001.tar"
    with tarfile.open(shard) as tar:   # inside crater-000004's image (`png`; `image.png` before the common names)
        offset = tar.getmember("crater-000004.png").offset_data
    flip_byte(shard, offset + 60)
    report = verify(str(dest))
    problems = [str(p) for p in report.problems]
    assert not report.ok
    assert "shard-000001.tar: sha256 differs from the manifest (content changed)" in problems
    assert any(p.startswith("shard-000001.tar sample crater-000004: ") for p in problems)
    assert all("shard-000001.tar" in p for p in problems)  # the others are fine


def test_verify_names_truncated_and_missing_shards(tmp_path):
    dest = tmp_path / "set"
    write_craters(dest, count=12, shard_samples=4, resolution=8)
    shard = dest / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:1500])
    (dest / "shard-000002.tar").unlink()
    problems = [str(p) for p in verify(str(dest)).problems]
    assert any(p.startswith("shard-000000.tar: ") and "bytes, the manifest says" in p for p in problems)
    assert any(p.startswith("shard-000000.tar: ") and "samples, the manifest says 4" in p for p in problems)
    assert any(p.startswith("shard-000002.tar: cannot read") for p in problems)
    assert not any("shard-000001" in p for p in problems)


def test_describe_and_previews(tmp_path):
    dest = tmp_path / "set"
    write_craters(dest, count=64, shard_samples=8, resolution=8)
    text = describe(str(dest))
    assert "shard-000007.tar" in text and "64 samples in 8 shards" in text
    img = Image.open(save_preview(str(dest), str(tmp_path / "p.png"), n=9))
    assert img.mode == "L" and img.size == (3 * 10 + 2, 3 * 10 + 2)

    grid = image_grid(np.full((5, 4, 6, 3), 200, np.uint8), nrow=2, pad=1)
    assert grid.shape == (3 * 5 + 1, 2 * 7 + 1, 3) and grid[0, 0, 0] == 0 and grid[1, 1, 0] == 200

    # pairs: one row a sample, cond | mask | image
    url = builtin.ensure_builtin("builtin:timeseries?count=4&seed=0", str(tmp_path), 16, 3)
    img = Image.open(save_preview(url, str(tmp_path / "ts.png"), n=4))
    assert img.mode == "RGB" and img.size == (3 * 18 + 2, 4 * 18 + 2)
    a = np.asarray(img)
    mask_cell = a[2:18, 20:36]
    assert (mask_cell[..., 0] == mask_cell[..., 1]).all() and set(np.unique(mask_cell)) <= {0, 255}
    assert len(read_manifest(url)) == 1
