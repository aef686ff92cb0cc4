"""The held-out split of a shard set, and which samples an evaluation reads.

A sample is held out by a hash of its key (`__key__`), never by its place in the set: the split
stays the same when the set is reshuffled, resharded or rebuilt in another order, it does not
follow the manifest's order (class-folder sets are written class by class, so "the last 10%"
would be one class), and training and evaluation agree on it without sharing any state.
A fraction f holds out the keys whose hash falls below f, so a sample never changes side when
others are added to the set; a count n holds out the n keys with the smallest hashes.

Readers work with positions (index of a sample in its shard, per shard in manifest order). The
manifest records how many samples a shard holds, not their keys: the keys are read from the
shards once per process and set (memoised by the set's content fingerprint).
"""
from __future__ import annotations

import functools
import hashlib
import random
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .card import read_card, read_manifest
from .shard_reader import Prefetcher, read_piece

HOLDOUT_SALT = "orbitgen-holdout"
EVAL_SALT = "orbitgen-eval"
MIN_HELD_OUT = 2  # FID and KID compare two sets of features: fewer than 2 held-out samples can't be scored
Holdout = float | int | None
Positions = list[np.ndarray]  # per shard in manifest order: sorted indices of the chosen samples


def holdout_problem(holdout: object) -> str | None:
    """What is wrong with a `holdout` value, or None if it is null, a fraction 0<x<1 or a count
    >= MIN_HELD_OUT."""
    if holdout is None:
        return None
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)):
        return (f"must be null, a fraction between 0 and 1 or a sample count >= {MIN_HELD_OUT}, "
                f"not {type(holdout).__name__}")
    if isinstance(holdout, float) and not 0 < holdout < 1:
        return f"a fraction must lie strictly between 0 and 1 (a count is a whole number >= {MIN_HELD_OUT}, e.g. 100)"
    if isinstance(holdout, int) and holdout < MIN_HELD_OUT:
        return f"a count must be >= {MIN_HELD_OUT}, what evaluation needs (or a fraction between 0 and 1, e.g. 0.1)"
    return None


def key_hash(key: str, salt: str = HOLDOUT_SALT) -> float:
    """The key's place in [0, 1): blake2b, so the same on every machine and Python version."""
    digest = hashlib.blake2b(f"{salt}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def held_out_keys(keys, holdout: Holdout) -> set[str]:
    """The keys among `keys` that `holdout` sets aside (none for null)."""
    if problem := holdout_problem(holdout):
        raise ValueError(f"data.holdout={holdout!r}: {problem}")
    if holdout is None:
        return set()
    if isinstance(holdout, float):
        return {k for k in keys if key_hash(k) < holdout}
    return set(sorted(keys, key=lambda k: (key_hash(k), k))[:holdout])


@functools.lru_cache(maxsize=16)
def _shard_keys(url: str, fingerprint: str) -> tuple[tuple[str, ...], ...]:
    manifest = read_manifest(url)
    prefetcher = Prefetcher(manifest.url)
    try:
        # A sample the shard lacks comes as a "#index" placeholder: unreadable either way.
        return tuple(tuple(raw["__key__"] for raw in read_piece(shard, 0, int(count), prefetcher=prefetcher))
                     for shard, count in zip(manifest.url, manifest.samples))
    finally:
        prefetcher.close()


def shard_keys(url: str) -> tuple[tuple[str, ...], ...]:
    """The keys of each shard, in manifest order (read from the shards: the manifest has no keys)."""
    return _shard_keys(url, read_card(url).fingerprint)


@dataclass(frozen=True)
class HoldoutSplit:
    """Positions of the training and the held-out samples of a set under one `holdout` value."""

    holdout: Holdout
    training: Positions
    held_out: Positions

    @property
    def sizes(self) -> tuple[int, int]:
        """(training samples, held-out samples)."""
        return sum(len(p) for p in self.training), sum(len(p) for p in self.held_out)


def holdout_split(url: str, holdout: Holdout) -> HoldoutSplit:
    """The split of the set at `url`; an error (naming data.holdout and the sizes) when training
    would get nothing, or evaluation fewer than MIN_HELD_OUT samples: better at the start of a
    run than at its first evaluation."""
    keys = shard_keys(url)
    out = held_out_keys((k for shard in keys for k in shard), holdout)
    training = [np.array([i for i, k in enumerate(shard) if k not in out], dtype=np.int64) for shard in keys]
    held = [np.array([i for i, k in enumerate(shard) if k in out], dtype=np.int64) for shard in keys]
    split = HoldoutSplit(holdout, training, held)
    kept, n_out = split.sizes
    if holdout is not None and (not kept or n_out < MIN_HELD_OUT):
        what = "all" if not kept else str(n_out)
        raise ValueError(f"data.holdout={holdout!r} holds out {what} of the {kept + n_out} samples of {url}: "
                         f"training needs at least one and evaluation {MIN_HELD_OUT}; "
                         + (f"use a count (data.holdout: {MIN_HELD_OUT} or more) or a larger fraction" if kept
                            else "use a smaller fraction or count"))
    return split


def _choose(pool: Sequence, n: int, seed: int, shards: int, position: Callable[..., tuple[int, int]]) -> Positions:
    picked = random.Random(f"{EVAL_SALT}/{seed}").sample(pool, min(n, len(pool)))
    out: list[list[int]] = [[] for _ in range(shards)]
    for p in picked:
        shard, index = position(p)
        out[shard].append(index)
    return [np.array(sorted(p), dtype=np.int64) for p in out]


def evaluation_positions(url: str, n: int, seed: int, holdout: Holdout = None) -> Positions:
    """What an evaluation reads: up to `n` samples drawn with `seed` from the held-out split when
    `holdout` is set, else from the whole set. The same draw on every call."""
    counts = [int(c) for c in read_manifest(url).samples]
    if holdout is not None:
        pool = [(s, int(i)) for s, idx in enumerate(holdout_split(url, holdout).held_out) for i in idx]
        return _choose(pool, n, seed, len(counts), lambda p: p)
    starts = np.cumsum([0] + counts)

    def position(flat: int) -> tuple[int, int]:  # a place in the manifest-order run -> (shard, index)
        shard = int(np.searchsorted(starts, flat, side="right")) - 1
        return shard, flat - int(starts[shard])

    return _choose(range(int(starts[-1])), n, seed, len(counts), position)
