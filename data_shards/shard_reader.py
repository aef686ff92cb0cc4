"""Reading shards: a tar's samples as raw bytes, with retries, prefetching and damage accounting.

Remote shards (s3:// and other object stores) are fetched whole with one GET, in a background
thread one shard ahead of the one being decoded: on the loopback S3 server that beat streaming
reads with 5-64 MiB read-ahead blocks and a `pipe:` to the aws CLI (benchmarks/BENCHMARKS.md).
Local shards are streamed from disk. Memory: a reader holds at most the shard it decodes and
the one being fetched, so keep shards to a few hundred MB (`--shard-size 256MB`).

Failures: a transport error (connection refused or reset, timeout, 5xx) retries the shard with
capped exponential backoff for up to $ORBITGEN_DATA_RETRY_S (3 min) after it started failing
(storage.Retries, counted in `storage.retries()`), resuming after the last sample already
delivered: an object store that is down for a minute costs time, not samples. A shard that
yields nothing before the budget is spent "cannot be read at all": `ShardReadError` names it.
A shard damaged part-way (truncated, bad header: `tar_reader.DamagedShard`, never retried)
delivers what it can; each sample the manifest promises but the shard lacks comes out as a
placeholder `{"__missing__": reason}` so callers can count it and keep positions exact.
"""
from __future__ import annotations

import io
import logging
import os
import tarfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Iterable, Iterator

from .errors import EnvironmentProblem, UserError
from .member_names import UnsafeMemberName
from .storage import PERMANENT_ERRORS, GaveUp, Retries, filesystem, is_local
from .tar_reader import DamagedShard, tar_files

log = logging.getLogger(__name__)


class ShardReadError(EnvironmentProblem):
    """A shard that could not be read at all (gone, not permitted, its store away for the whole
    retry budget): the message names it; one `error:` line, exit 1, where it reaches the CLI."""


class DamagedShardError(ShardReadError, UserError):
    """A shard whose bytes are damaged before its first sample: no retry helps, the set must be
    rebuilt or the shard restored (a UserError: one `error:` line where it reaches the CLI)."""


def tar_samples(f: IO[bytes], shard: str = "shard") -> Iterator[dict]:
    """Samples of a WebDataset tar stream: consecutive files with the same key (the name up to
    the first dot of its base name) as `{"__key__": key, "png": bytes, "json": bytes}`.
    `shard` names the stream in errors."""
    current: dict | None = None
    for name, data in tar_files(f, shard):
        folder, _, base = name.rpartition("/")
        stem, dot, ext = base.partition(".")
        key = f"{folder}/{stem}" if folder else stem
        if not dot or stem.startswith("_"):
            continue  # not a sample part (webdataset's rule: "key.ext"; "__" names are metadata)
        if current is not None and current["__key__"] != key:
            yield current
            current = None
        if current is None:
            current = {"__key__": key}
        current[ext] = data
    if current is not None:
        yield current


def fetch(url: str, retry: Retries | None = None) -> bytes:
    """A whole remote object, retried on transient errors (`retry`, else a new full budget);
    GaveUp once they outlast the budget."""
    fs, path = filesystem(url)
    retry = retry or Retries(f"reading {url}")
    while True:
        try:
            return fs.cat_file(path)
        except PERMANENT_ERRORS:
            raise
        except Exception as exc:  # botocore/aiohttp errors share no base class
            retry.wait(exc)


def read_shard(url: str) -> bytes:
    """A whole shard: a local file read as it is, a remote object through `fetch` (retried)."""
    if is_local(url):
        fs, path = filesystem(url)
        with fs.open(path, "rb") as f:
            return f.read()
    return fetch(url)


_pool: tuple[int, ThreadPoolExecutor] | None = None


def _fetch_thread() -> ThreadPoolExecutor:
    """One fetch thread per process, kept for its life: fsspec caches a filesystem per thread,
    and a new s3fs client costs a good fraction of a second of CPU."""
    global _pool
    if _pool is None or _pool[0] != os.getpid():  # a forked DataLoader worker starts its own
        _pool = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="shard-prefetch"))
    return _pool[1]


class Prefetcher:
    """Fetches the remote shards of a reading plan in the background, `ahead` shards beyond the
    one asked for. `get(url)` in plan order returns its bytes (or raises the fetch's error);
    local urls give None (they are streamed from disk)."""

    def __init__(self, urls: Iterable[str], ahead: int = 1):
        self.pending = deque(u for u in urls if not is_local(u))
        self.queue: deque[tuple[str, Future]] = deque()
        self.ahead = ahead

    def _fill(self, n: int) -> None:
        while self.pending and len(self.queue) < n:
            url = self.pending.popleft()
            self.queue.append((url, _fetch_thread().submit(fetch, url)))

    def get(self, url: str) -> bytes | None:
        if is_local(url):
            return None
        self._fill(self.ahead + 1)
        if not self.queue or self.queue[0][0] != url:
            return fetch(url)  # asked out of plan order
        _, future = self.queue.popleft()
        self._fill(self.ahead)
        return future.result()

    def close(self) -> None:
        for _, future in self.queue:
            future.cancel()
        self.queue.clear()


def _open(url: str, prefetcher: Prefetcher | None, retry: Retries) -> IO[bytes]:
    if prefetcher is not None:
        data = prefetcher.get(url)   # fetched with retries of its own
        if data is not None:
            return io.BytesIO(data)
    if is_local(url):
        fs, path = filesystem(url)
        return fs.open(path, "rb")
    return io.BytesIO(fetch(url, retry))


def read_piece(url: str, lo: int = 0, hi: int | None = None, *, prefetcher: Prefetcher | None = None,
               budget_s: float | None = None) -> Iterator[dict]:
    """Samples `lo` .. `hi - 1` of the shard at `url` (hi None: to its end), each with `__url__`
    and `__index__` (position in the shard); placeholders for promised samples it lacks.
    `budget_s`: how long transport errors are retried (None: `storage.retry_budget_s()`)."""
    done, any_read, damage, damaged_bytes = lo, False, None, None
    retry = Retries(f"reading {url}", budget_s)
    first = True
    while True:
        try:
            with _open(url, prefetcher if first else None, retry) as f:
                first = False
                for index, sample in enumerate(tar_samples(f, url)):
                    any_read = True
                    if index < done:
                        continue  # delivered before a retry, or before this reader's piece
                    if hi is not None and index >= hi:
                        return
                    sample["__url__"], sample["__index__"] = url, index
                    yield sample
                    done = index + 1
                    retry.progressed()
            break  # the shard ended
        except (tarfile.TarError, EOFError) as exc:  # the bytes are damaged: reading again won't help
            damage = f"damaged shard: {type(exc).__name__}: {exc}"
            damaged_bytes = exc if isinstance(exc, DamagedShard) else None
            break
        except UnsafeMemberName:   # refused, not damaged: no retry (the message names the shard)
            raise
        except (FileNotFoundError, PermissionError) as exc:
            raise ShardReadError(f"cannot read shard {url}: {type(exc).__name__}: {exc}") from exc
        except GaveUp as exc:
            damage = str(exc)
            break
        except Exception as exc:  # transport errors: try again from the start of the shard
            try:
                retry.wait(exc)
            except GaveUp as gave_up:
                damage = str(gave_up)
                break
    if not any_read and damaged_bytes is not None:   # its message names the shard and the member
        where = str(damaged_bytes).removeprefix(f"{url}: ")
        raise DamagedShardError(f"cannot read shard {url}: damaged at {where}; `orbitgen data verify` lists every "
                                "damaged shard of the set; rebuild the set or restore the shard")
    if not any_read and damage is not None:
        raise ShardReadError(f"cannot read shard {url}: {damage}")
    if hi is not None and done < hi:
        reason = damage or f"shard ended after {done} samples"
        log.warning("%s: %d samples missing from index %d: %s", url, hi - done, done, reason)
        for index in range(done, hi):
            yield {"__key__": f"#{index}", "__url__": url, "__index__": index, "__missing__": reason}
