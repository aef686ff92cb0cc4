"""Shards -> batches of uint8 tensors: an endless, resumable training stream per rank, and one
ordered pass for evaluation.

An epoch, for a set of N samples read by W ranks with batch size B:
  * the shards are permuted (same seed everywhere, new order each epoch) and their samples laid
    end to end; rank r takes the contiguous run [r*E*B, (r+1)*E*B) with E = N // (W*B), so every
    rank yields exactly E batches per epoch (unequal counts hang DDP) and the shares are disjoint;
    the last N - W*E*B samples of the permuted run (fewer than W*B, different ones each epoch)
    wait for a later epoch;
  * inside a rank, the DataLoader takes batches from its workers in turn (batch i from worker
    i mod n), so each worker reads the contiguous part of the rank's run that fills exactly its
    turns of this epoch: disjoint, and the rank's batches e*E .. e*E+E-1 are exactly epoch e;
  * each worker shuffles its part in a buffer seeded by (seed, epoch, rank, worker), then decodes.
Held-out samples (`holdout`, see split.py) are not part of the run at all: N counts the training
samples only, positions are places among a shard's training samples, and readers drop the
held-out ones they pass, so every guarantee above holds for the training samples.
Shards are read whole by one reader except at the edges of a run, where two neighbours each read
their samples of it. Positions are counted in the manifest, not in what decodes: a corrupt sample
is skipped and counted, and its place in the batch is taken by the next good sample, so batch
counts, shares and resume positions never shift. Resuming at batch k skips whole epochs
arithmetically and, inside the epoch, drops raw (undecoded) samples up to the position.
"""
from __future__ import annotations

import itertools
import logging
import random
from typing import Iterator

import numpy as np
import torch

from .card import read_card, read_manifest
from .decode import IMAGE_KEYS, check_keys, decode_sample, expected_shapes
from .shard_reader import Prefetcher, read_piece
from .split import Holdout, Positions, holdout_split
from .storage import retries as storage_retries

log = logging.getLogger(__name__)

BARREN_EPOCHS = 3  # epochs in a row without one readable sample before a worker gives up
_skipped = 0                           # samples this process decoded as corrupt
_reported: dict[tuple[int, int], int] = {}  # (stream, DataLoader worker) -> that worker's count
_reported_retries: dict[tuple[int, int], int] = {}  # the same for retried reads


def skipped() -> int:
    """Samples skipped as unreadable in this process's streams, its DataLoader workers' included
    (their counts ride along with the batches): what the training loop logs."""
    return _skipped + sum(_reported.values())


def retries() -> int:
    """Reads retried after storage faults (storage.Retries) in this process and its streams'
    DataLoader workers: what the training loop logs as `data_retries`."""
    return storage_retries() + sum(_reported_retries.values())


def _count_skip(raw: dict, exc: Exception) -> None:
    global _skipped
    _skipped += 1
    log.warning("skipping corrupt sample %s in %s: %s: %s (%d skipped in this process)",
                raw.get("__key__"), raw.get("__url__"), type(exc).__name__, exc, _skipped)


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


def turns(worker: int, num_workers: int, start: int, stop: int) -> int:
    """How many of the rank's batches start .. stop-1 come from `worker` (batch i from worker i mod n)."""
    return len(range(start + (worker - start) % num_workers, stop, num_workers))


def epoch_pieces(counts: list[int], epoch: int, seed: int, rank: int, world_size: int, worker: int,
                 num_workers: int, batch_size: int) -> list[tuple[int, int, int]]:
    """What one worker reads in one epoch: (shard index, first sample, end sample) in read order."""
    per_epoch = sum(counts) // (world_size * batch_size)  # batches per rank
    first = epoch * per_epoch
    before = sum(turns(v, num_workers, first, first + per_epoch) for v in range(worker))
    mine = turns(worker, num_workers, first, first + per_epoch)
    start = (rank * per_epoch + before) * batch_size
    stop = start + mine * batch_size
    order = list(range(len(counts)))
    random.Random(f"{seed}/{epoch}").shuffle(order)  # the same permutation on every rank and worker
    pieces, offset = [], 0
    for shard in order:
        lo, hi = max(start, offset), min(stop, offset + counts[shard])
        if lo < hi:
            pieces.append((shard, lo - offset, hi - offset))
        offset += counts[shard]
    return pieces


def buffer_shuffle(items, size: int, rng: random.Random) -> Iterator:
    """Shuffle a stream in a buffer of `size`; deterministic for a given rng state."""
    buf: list = []
    for x in items:
        buf.append(x)
        if len(buf) >= size:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def read_positions(url: str, indices: np.ndarray, prefetcher: Prefetcher | None = None) -> Iterator[dict]:
    """The raw samples of a shard at `indices` (sorted), skipping those in between unread."""
    if not len(indices):
        return
    wanted = set(indices.tolist())
    for raw in read_piece(url, int(indices[0]), int(indices[-1]) + 1, prefetcher=prefetcher):
        if raw["__index__"] in wanted:
            yield raw


def training_share(url: str, holdout: Holdout = None) -> tuple[list[int], Positions | None]:
    """(training samples per shard, their indices per shard): the whole shards (indices None)
    without a holdout."""
    if holdout is None:
        return [int(c) for c in read_manifest(url).samples], None
    kept = holdout_split(url, holdout).training
    return [len(k) for k in kept], kept


class _Worker(torch.utils.data.IterableDataset):
    """Endless batches of one (rank, DataLoader worker), from rank batch `start_batch` on."""

    def __init__(self, urls, counts, shapes, *, rank, world_size, batch_size, seed, shuffle_buffer, keys, start_batch,
                 kept: Positions | None = None, resize: bool = False):
        super().__init__()
        self.urls, self.counts, self.shapes = list(urls), [int(c) for c in counts], shapes
        self.resize = resize  # the card's: images of another size are fitted, not refused (decode.py)
        self.kept = kept  # per shard, the indices of its training samples; None: all of them
        self.rank, self.world_size, self.batch_size, self.seed = rank, world_size, batch_size, seed
        self.shuffle_buffer, self.keys, self.start_batch = shuffle_buffer, keys, start_batch
        self.per_epoch = sum(self.counts) // (world_size * batch_size)

    def _raw(self, epoch: int, worker: int, num_workers: int) -> Iterator[dict]:
        pieces = epoch_pieces(self.counts, epoch, self.seed, self.rank, self.world_size, worker, num_workers,
                              self.batch_size)
        prefetcher = Prefetcher(self.urls[s] for s, _, _ in pieces)
        try:
            raw = itertools.chain.from_iterable(
                read_piece(self.urls[s], lo, hi, prefetcher=prefetcher) if self.kept is None
                else read_positions(self.urls[s], self.kept[s][lo:hi], prefetcher=prefetcher)
                for s, lo, hi in pieces)
            rng = random.Random(f"{self.seed}/{epoch}/{self.rank}/{worker}")
            yield from buffer_shuffle(raw, self.shuffle_buffer, rng)
        finally:
            prefetcher.close()

    def samples(self, worker: int, num_workers: int) -> Iterator[dict]:
        """This worker's decoded samples, endless; each slot filled even where a sample is corrupt."""
        done = turns(worker, num_workers, 0, self.start_batch)  # this worker's batches before the start
        epoch = (worker + done * num_workers) // self.per_epoch  # epoch of its next batch
        skip = (done - turns(worker, num_workers, 0, epoch * self.per_epoch)) * self.batch_size
        owed = 0  # corrupt slots waiting for the next good sample
        barren = 0  # epochs in a row whose share of this worker had nothing readable
        while True:
            slots = turns(worker, num_workers, epoch * self.per_epoch, (epoch + 1) * self.per_epoch) * self.batch_size
            good = 0
            for raw in itertools.islice(self._raw(epoch, worker, num_workers), skip, None):
                try:
                    s = decode_sample(raw, self.keys, self.shapes, self.resize)
                except Exception as exc:  # whatever a decoder raises on bad bytes
                    _count_skip(raw, exc)
                    owed += 1
                    continue
                good += 1
                for _ in range(owed + 1):
                    yield s
                owed = 0
            # A share can fall inside one damaged stretch; the next epoch's shares lie elsewhere.
            if good:
                barren = 0
            elif slots > skip:
                barren += 1
            if barren >= BARREN_EPOCHS:
                raise RuntimeError(f"rank {self.rank} worker {worker}: no readable sample in its shares of "
                                   f"{barren} epochs in a row (up to epoch {epoch}) of "
                                   f"{self.urls[0].rsplit('/', 1)[0]}")
            epoch, skip = epoch + 1, 0

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        loader_worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        # A DataLoader always starts its turns at worker 0: after resuming at batch k, its worker j
        # serves the batches that worker (j + k) mod n served in the uninterrupted stream.
        worker = (loader_worker + self.start_batch) % num_workers
        skipped_before, retries_before = _skipped, storage_retries()   # a forked worker inherits the counts
        samples = self.samples(worker, num_workers)
        while True:
            batch = collate([next(samples) for _ in range(self.batch_size)])
            batch["__skipped__"], batch["__worker__"] = _skipped - skipped_before, worker
            batch["__retries__"] = storage_retries() - retries_before
            yield batch


def batches_per_epoch(url: str, world_size: int, batch_size: int, holdout: Holdout = None) -> int:
    """E: the batches every rank yields per epoch of `image_stream` (with the same `holdout`)."""
    return sum(training_share(url, holdout)[0]) // (world_size * batch_size)


def image_stream(url: str, *, rank: int, world_size: int, batch_size: int, seed: int,
                 shuffle_buffer: int = 256, num_workers: int = 1, keys: tuple[str, ...] = ("image",),
                 start_batch: int = 0, holdout: Holdout = None) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches of this rank's share: `{"image": uint8 (B, C, H, W), "cls": int64 (B,),
    "json": [...], "__key__": [...]}` for the `keys` asked, always full, E = N // (world_size *
    batch_size) batches per epoch on every rank. `start_batch` = batches already consumed (a
    resumed run's step count): the stream yields what an uninterrupted one would from there.
    `holdout` (split.py): those samples are never yielded, N counts the others."""
    keys = check_keys(keys)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    if batch_size < 1 or start_batch < 0:
        raise ValueError("batch_size must be >= 1 and start_batch >= 0")
    manifest, card = read_manifest(url), read_card(url)
    missing = [k for k in keys if k not in card.modalities and k != "json"]
    if missing:
        raise ValueError(f"{url} has no {', '.join(missing)} (its samples have {', '.join(card.modalities)})")
    counts, kept = training_share(url, holdout)
    total = sum(counts)
    if total < world_size * batch_size:
        held = f" ({int(manifest.samples.sum()) - total} more held out by data.holdout={holdout!r})" if kept else ""
        raise ValueError(f"{url}: {total} samples{held} cannot fill a batch of {batch_size} on each of "
                         f"{world_size} ranks")
    dataset = _Worker(manifest.url, counts, expected_shapes(card.resolution, card.channels),
                      rank=rank, world_size=world_size, batch_size=batch_size, seed=seed,
                      shuffle_buffer=max(1, shuffle_buffer), keys=keys, start_batch=start_batch, kept=kept,
                      resize=card.resize)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                         persistent_workers=num_workers > 0,
                                         prefetch_factor=2 if num_workers > 0 else None)
    return _counting(iter(loader), num_workers > 0)


def _counting(batches, from_workers: bool) -> Iterator[dict]:
    """Takes the workers' skip and retry counts off the batches into `skipped()` and `retries()`."""
    stream = object()
    for batch in batches:
        count, retried, worker = batch.pop("__skipped__"), batch.pop("__retries__"), batch.pop("__worker__")
        if from_workers:
            _reported[(id(stream), int(worker))] = int(count)
            _reported_retries[(id(stream), int(worker))] = int(retried)
        yield batch


def iterate_once(url: str, batch_size: int, limit: int | None = None,
                 keys: tuple[str, ...] = ("image",), positions: Positions | None = None) -> Iterator[dict]:
    """Every readable sample once, in manifest order, in this process (the last batch may be short).
    `positions` (per shard, sorted sample indices; see split.py) reads only those samples."""
    keys = check_keys(keys)
    manifest, card = read_manifest(url), read_card(url)
    shapes = expected_shapes(card.resolution, card.channels)
    if positions is None:
        positions = [np.arange(int(c)) for c in manifest.samples]
    if len(positions) != len(manifest):
        raise ValueError(f"{url}: positions for {len(positions)} shards, the set has {len(manifest)}")
    shards = [(u, p) for u, p in zip(manifest.url, positions) if len(p)]

    def samples():
        prefetcher = Prefetcher(u for u, _ in shards)
        try:
            for shard_url, indices in shards:
                for raw in read_positions(shard_url, indices, prefetcher=prefetcher):
                    try:
                        yield decode_sample(raw, keys, shapes, card.resize)
                    except Exception as exc:
                        _count_skip(raw, exc)
        finally:
            prefetcher.close()

    it = itertools.islice(samples(), limit)
    while batch := list(itertools.islice(it, batch_size)):
        yield collate(batch)
