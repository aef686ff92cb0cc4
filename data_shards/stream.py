"""Shards -> batches of uint8 tensors: an endless shuffled stream for training, one ordered pass
for evaluation.

Splitting, for a set of S shards read by W ranks with N DataLoader workers each (every epoch
the shard order is permuted with the same seed everywhere, so shares never overlap):
  S >= W*N   each worker reads its own shards (rank share, then worker share of it);
  S >= W     each rank reads its own shards, its workers take every N-th of their samples;
  S <  W     everybody reads every shard and keeps every (W*N)-th sample.
In the last case ranks are interleaved first (sample i goes to rank i mod W), so any set with at
least W samples feeds every rank; a worker left with nothing to read just ends.
Sample indices come from the manifest, so a skipped (corrupt) sample never shifts a share.
"""
from __future__ import annotations

import io
import itertools
import json
import logging
import random
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from .card import read_manifest
from .storage import register_webdataset_schemes

log = logging.getLogger(__name__)

IMAGE_KEYS = ("image", "cond", "mask")
OTHER_KEYS = ("cls", "json")
_skipped = 0  # per process: DataLoader workers each count their own


def skipped() -> int:
    """Samples this process skipped as unreadable (corrupt PNG, missing part, bad shard)."""
    return _skipped


def _wds_url(url: str) -> str:
    # webdataset percent-decodes file:// URLs; give it the plain path instead.
    return url[len("file://"):] if url.startswith("file://") else url


def _warn_and_continue(exc: Exception) -> bool:
    global _skipped
    _skipped += 1
    log.warning("skipping unreadable shard data: %s", exc)
    return True


def decode_png(data: bytes) -> np.ndarray:
    """PNG -> (H, W, C) uint8 keeping the channel count (gray stays 1 channel)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    if img.mode not in ("L", "RGB"):
        img = img.convert("L" if img.mode in ("1", "LA", "I", "I;16", "F") else "RGB")
    a = np.asarray(img, dtype=np.uint8)
    return a[:, :, None] if a.ndim == 2 else a


def _decoder(keys: tuple[str, ...]):
    def decode(samples):
        global _skipped
        for s in samples:
            try:
                out = {"__key__": s["__key__"]}
                for k in keys:
                    if k in IMAGE_KEYS:
                        out[k] = decode_png(s[f"{k}.png"])
                    elif k == "cls":
                        out[k] = int(s["cls"])
                    else:
                        out[k] = json.loads(s["json"])
            except Exception as exc:
                _skipped += 1
                log.warning("skipping corrupt sample %s in %s: %r (%d skipped in this process)",
                            s.get("__key__"), s.get("__url__"), exc, _skipped)
                continue
            yield out
    return decode


def collate(samples: list[dict]) -> dict:
    """Images -> (B, C, H, W) uint8 tensors, cls -> int64 tensor, keys and json -> lists."""
    batch = {"__key__": [s["__key__"] for s in samples]}
    for k in samples[0]:
        if k in IMAGE_KEYS:
            batch[k] = torch.from_numpy(np.stack([s[k] for s in samples])).permute(0, 3, 1, 2).contiguous()
        elif k == "cls":
            batch[k] = torch.tensor([s[k] for s in samples], dtype=torch.int64)
        elif k == "json":
            batch[k] = [s[k] for s in samples]
    return batch


def _check_keys(keys) -> tuple[str, ...]:
    keys = tuple(keys)
    bad = [k for k in keys if k not in IMAGE_KEYS + OTHER_KEYS]
    if bad or not keys:
        raise ValueError(f"keys {keys}: each must be one of {IMAGE_KEYS + OTHER_KEYS}")
    return keys


def _indexed(shard_base: dict[str, int]):
    """Adds `__index__`: the sample's position in the set, from the manifest's shard offsets."""
    def index(samples):
        pos: dict[str, int] = {}
        for s in samples:
            j = pos.get(s["__url__"], 0)
            pos[s["__url__"]] = j + 1
            s["__index__"] = shard_base[s["__url__"]] + j
            yield s
    return index


def share(n_shards: int, epoch: int, seed: int, rank: int, world_size: int,
          worker: int, num_workers: int) -> tuple[list[int], int, int]:
    """(shards to read, m, r): read these shards in this order, keep samples with index % m == r."""
    order = list(range(n_shards))
    random.Random(f"{seed}/{epoch}").shuffle(order)  # same permutation on every rank and worker
    if n_shards >= world_size * num_workers:
        return order[rank::world_size][worker::num_workers], 1, 0
    if n_shards >= world_size:
        return order[rank::world_size], num_workers, worker
    # rank-minor, so that any set with >= world_size samples feeds every rank
    return order, world_size * num_workers, worker * world_size + rank


class _Epochs(torch.utils.data.IterableDataset):
    """Endless samples of one (rank, worker): epoch after epoch, each with its own shuffle."""

    def __init__(self, urls, counts, *, rank, world_size, seed, shuffle_buffer, keys):
        super().__init__()
        self.urls, self.counts = [_wds_url(u) for u in urls], list(counts)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.keys = shuffle_buffer, keys

    def has_share(self, e: int, worker: int, num_workers: int) -> bool:
        shards, m, r = share(len(self.urls), e, self.seed, self.rank, self.world_size, worker, num_workers)
        return sum(self.counts[i] for i in shards) > r

    def epoch(self, e: int, worker: int, num_workers: int) -> Iterator[dict]:
        shards, m, r = share(len(self.urls), e, self.seed, self.rank, self.world_size, worker, num_workers)
        if not self.has_share(e, worker, num_workers):
            return
        base, total = {}, 0
        for i in sorted(shards):  # indices count in manifest order, whatever the read order
            base[self.urls[i]] = total
            total += self.counts[i]
        rng = random.Random(f"{self.seed}/{e}/{self.rank}/{worker}")
        yield from wds.DataPipeline(
            wds.SimpleShardList([self.urls[i] for i in shards]),
            wds.tarfile_to_samples(handler=_warn_and_continue),
            _indexed(base),
            wds.select(lambda s: s["__index__"] % m == r),
            _decoder(self.keys),
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng),
        )

    def __iter__(self):
        register_webdataset_schemes()  # again here: spawned workers don't inherit it
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        for e in itertools.count():
            n = 0
            for s in self.epoch(e, worker, num_workers):
                n += 1
                yield s
            if n == 0:
                if self.has_share(e, worker, num_workers):
                    raise RuntimeError(f"{self.urls[0]}...: rank {self.rank} worker {worker} "
                                       f"found no readable sample in its share (epoch {e})")
                return  # fewer samples than readers: this worker has none; the others go on


def image_stream(url: str, *, rank: int, world_size: int, batch_size: int, seed: int,
                 shuffle_buffer: int = 256, num_workers: int = 1,
                 keys: tuple[str, ...] = ("image",)) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches `{"image": uint8 (B, C, H, W), "__key__": [...]}` of this rank's share.

    Epochs repeat forever; batches are always full and may straddle an epoch boundary.
    """
    keys = _check_keys(keys)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    manifest = read_manifest(url)
    if int(manifest.samples.sum()) < world_size:
        raise ValueError(f"{url}: {int(manifest.samples.sum())} samples cannot feed {world_size} ranks")
    register_webdataset_schemes()
    dataset = wds.DataPipeline(
        _Epochs(manifest.url, manifest.samples, rank=rank, world_size=world_size, seed=seed,
                shuffle_buffer=max(1, shuffle_buffer), keys=keys),
        wds.batched(batch_size, collation_fn=collate, partial=False),
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                         persistent_workers=num_workers > 0,
                                         prefetch_factor=2 if num_workers > 0 else None)
    return iter(loader)


def iterate_once(url: str, batch_size: int, limit: int | None = None,
                 keys: tuple[str, ...] = ("image",)) -> Iterator[dict]:
    """Every readable sample once, in manifest order, in this process (the last batch may be short)."""
    keys = _check_keys(keys)
    manifest = read_manifest(url)
    register_webdataset_schemes()
    samples = wds.DataPipeline(
        wds.SimpleShardList([_wds_url(u) for u in manifest.url]),
        wds.tarfile_to_samples(handler=_warn_and_continue),
        _decoder(keys),
    )
    return wds.batched(batch_size, collation_fn=collate, partial=True)(
        itertools.islice(iter(samples), limit))
