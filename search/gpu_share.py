"""A search trial's share of a GPU: its memory capped to that share, its cached memory given back.

Tune packs trials onto one GPU by their fractional `GPU` resource (`{GPU: 0.25}`: four trials per
card), but CUDA knows nothing of that: without a cap one trial's caching allocator can take the
whole card and the others fail with out-of-memory. And with `reuse_actors=True` an actor's cache
outlives its trial, so the next trial in that actor starts with the last one's memory held. On a
machine without CUDA (every test here) all of it does nothing.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import torch


def gpu_share(resources: Mapping[str, float]) -> float | None:
    """The fraction of one GPU a trial with these Tune resources owns: its `GPU` when strictly
    between 0 and 1; None for no GPU or whole GPUs (a trial alone on its cards needs no cap)."""
    share = float(resources.get("GPU", 0) or 0)
    return share if 0 < share < 1 else None


def cap_gpu_memory(share: float | None) -> bool:
    """Caps this process's CUDA allocations on its current device to `share` of the card's
    memory; whether a cap was set (never without CUDA or without a share)."""
    if share is None or not torch.cuda.is_available():
        return False
    torch.cuda.set_per_process_memory_fraction(share)
    return True


def release_gpu_memory() -> None:
    """Returns the allocator's cached, unused blocks to the card, for the next trial of a reused
    actor or another trial sharing the GPU."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def trial_gpu_share(resources: Mapping[str, float]) -> Iterator[float | None]:
    """Around one trial's work: the cap on entry, the cache released on exit (also on error).
    Tensors still referenced at exit are not freed: run the work in a function that returns
    before the block ends."""
    share = gpu_share(resources)
    cap_gpu_memory(share)
    try:
        yield share
    finally:
        release_gpu_memory()
