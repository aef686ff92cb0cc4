"""Helpers shared by the data-plane tests (test_data_*.py): crater-field shard sets and the keys streams read."""
from __future__ import annotations

from data_shards.card import DatasetCard
from data_shards.synthetic import crater_field
from data_shards.writer import write_shards


def write_craters(dest, count=40, shard_samples=10, resolution=16, channels=1, seed=0, **kw) -> DatasetCard:
    """A crater-field shard set: keys crater-000000, ... in order."""
    return write_shards(crater_field(count, resolution, channels, seed), str(dest), layout="synthetic:craters",
                        resolution=resolution, channels=channels, source=f"test seed={seed}",
                        shard_samples=shard_samples, progress=False, **kw)


def crater_keys(n: int) -> list[str]:
    return [f"crater-{i:06d}" for i in range(n)]


def stream_keys(url, world_size: int, num_workers: int, batch_size: int, batches: int, **kw) -> dict[int, list[list[str]]]:
    """rank -> the keys of its first `batches` batches (one list a batch), one stream per rank."""
    from data_shards.stream import image_stream

    out = {}
    for rank in range(world_size):
        it = image_stream(url, rank=rank, world_size=world_size, batch_size=batch_size,
                          num_workers=num_workers, **{"seed": 7, "shuffle_buffer": 16, **kw})
        out[rank] = [next(it)["__key__"] for _ in range(batches)]
        del it
    return out
