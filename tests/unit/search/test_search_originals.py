"""The search's originals, capped by `search.max_images`: a seeded draw from the whole set, the
same every time, never the first N (a class-folder set is written class by class)."""
from __future__ import annotations

import numpy as np

from data_shards.sources import Sample
from data_shards.writer import write_shards
from search.originals import load_originals

RES, N, CLASSES = 16, 60, 4


def test_capped_originals_are_a_seeded_draw_from_every_class(tmp_path):
    samples = [Sample(key=f"c{i * CLASSES // N}-{i:03d}", image=np.full((RES, RES, 1), i, np.uint8),
                      cls=i * CLASSES // N) for i in range(N)]
    url = str(tmp_path / "sorted")
    write_shards(samples, url, layout="test", resolution=RES, channels=1, source="test", shard_samples=7, progress=False)
    first = load_originals(url, 1, max_images=12)
    again = load_originals(url, 1, max_images=12)
    assert len(first.keys) == 12 and first.keys == again.keys
    assert len({k.split("-")[0] for k in first.keys}) > 1   # the first 12 would all be class 0
    assert len(load_originals(url, 1).keys) == N             # no cap: every image


def test_held_out_images_never_reach_the_search(tmp_path):
    from data_shards.split import held_out_keys

    samples = [Sample(key=f"k{i:03d}", image=np.full((RES, RES, 1), i, np.uint8)) for i in range(N)]
    url = str(tmp_path / "set")
    write_shards(samples, url, layout="test", resolution=RES, channels=1, source="test", shard_samples=7, progress=False)
    held = held_out_keys([s.key for s in samples], 12)
    assert len(held) == 12
    every = load_originals(url, 1, holdout=12)
    assert not set(every.keys) & held and len(every.keys) == N - 12
    capped = load_originals(url, 1, max_images=20, holdout=12)
    assert not set(capped.keys) & held and len(capped.keys) == 20
    assert capped.keys == load_originals(url, 1, max_images=20, holdout=12).keys   # the same draw each time
