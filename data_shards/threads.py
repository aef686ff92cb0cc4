"""An ordered, bounded thread map: what lets a build use every core.

PIL's decoders, resizers and zlib release the GIL, so decoding sources and encoding PNGs in
threads scales with cores without the pickling and start-up costs of processes.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")
THREADS = min(4, os.cpu_count() or 1)


def in_threads(fn: Callable[[T], R], items: Iterable[T], threads: int = THREADS) -> Iterator[R]:
    """`map(fn, items)` in order, `threads` at a time, at most 2 * `threads` results ahead.
    An exception surfaces when its item's turn comes, as in a plain loop."""
    with ThreadPoolExecutor(threads) as pool:
        window: deque = deque()
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= 2 * threads:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
