"""Where shards live: fsspec URLs (`file://`, plain paths, `s3://`) and webdataset's opener for them.

S3 settings come from the standard AWS variables plus `AWS_ENDPOINT_URL` for S3-compatible
servers (moto, MinIO, Ceph). Filesystem instances are cached by fsspec itself: its cache key
includes the process id (and the thread), so a forked DataLoader worker gets fresh s3fs
instances instead of sharing the parent's event loop and connections.
"""
from __future__ import annotations

import logging
import os
import random
import threading
import time
from typing import Any, Callable

import fsspec

from .endpoint import unanswered
from .errors import UserError

log = logging.getLogger(__name__)

_LOCAL = (None, "", "file", "local")


def _split(url: str) -> tuple[str | None, str]:
    if "://" not in url:
        return None, url
    protocol, rest = url.split("://", 1)
    return protocol, rest


def to_url(path_or_url: str) -> str:
    """Local paths become absolute `file://` URLs (no percent-encoding: fsspec doesn't decode it)."""
    path_or_url = str(path_or_url)
    protocol, rest = _split(path_or_url)
    if protocol is not None:
        return path_or_url
    return "file://" + os.path.abspath(os.path.expanduser(rest))


def join(url: str, *parts: str) -> str:
    """`join("s3://b/sets", "x", "shard-000000.tar")` -> "s3://b/sets/x/shard-000000.tar"."""
    out = str(url).rstrip("/")
    for p in parts:
        p = str(p).strip("/")
        if p:
            out = f"{out}/{p}"
    return out


def is_local(url: str) -> bool:
    return _split(str(url))[0] in _LOCAL


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `url` and the path inside it (no scheme)."""
    protocol, rest = _split(str(url))
    if protocol in _LOCAL:
        # auto_mkdir: writing a file creates its folders, as object stores do implicitly.
        return fsspec.filesystem("file", auto_mkdir=True), os.path.abspath(os.path.expanduser(rest))
    if protocol in ("s3", "s3a"):
        kwargs = {}
        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            # Not region_name: with it, s3fs/moto bucket creation fails (see ENVIRONMENT.md).
            kwargs["client_kwargs"] = {"endpoint_url": endpoint}
        # Credentials from the standard variables go into the instance itself: it is pickled to
        # Ray actors (run storage) whose processes may have started before they were set.
        for arg, var in (("key", "AWS_ACCESS_KEY_ID"), ("secret", "AWS_SECRET_ACCESS_KEY"), ("token", "AWS_SESSION_TOKEN")):
            if os.environ.get(var):
                kwargs[arg] = os.environ[var]
        fs = fsspec.filesystem("s3", **kwargs)
        return fs, fs._strip_protocol(url)
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def check_reachable(url: str) -> None:
    """Raise UserError at once when `url` is on an S3-compatible server (AWS_ENDPOINT_URL) that
    nobody answers: s3fs and botocore would retry the dead address for several seconds."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if _split(str(url))[0] in ("s3", "s3a") and endpoint:
        why = unanswered(endpoint)
        if why:
            raise UserError(f"{url}: the S3 endpoint {endpoint} (AWS_ENDPOINT_URL) does not answer: {why}")


def ray_storage(url: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train and Tune: local paths stay paths; other
    stores go through the same fsspec filesystem the data plane uses, wrapped for pyarrow."""
    fs, path = filesystem(url)
    if is_local(url):
        return path, None
    import pyarrow.fs

    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


# Errors worth another try when reading remote objects: connection resets, refusals, timeouts,
# 5xx (botocore and aiohttp errors share no base class). Missing objects and refused permissions
# are not transient.
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)

RETRY_ENV = "ORBITGEN_DATA_RETRY_S"
DEFAULT_RETRY_S = 180.0   # an object store restarting, a network partition healing: minutes, not hours
_retried = 0   # retries in this process; prefetch threads count too
_retried_lock = threading.Lock()


def retries() -> int:
    """Reads retried after a transport error in this process (its threads included)."""
    return _retried


def retry_budget_s() -> float:
    """How long reads keep being retried after they started failing: $ORBITGEN_DATA_RETRY_S, else 3 min."""
    return float(os.environ.get(RETRY_ENV) or DEFAULT_RETRY_S)


class GaveUp(IOError):
    """Reading failed with transport errors for longer than the retry budget."""


class Retries:
    """Capped exponential backoff over a bounded total time, for one read.

    The budget counts from the first failure (a long transfer before it costs nothing) and starts
    again once the read makes progress (`progressed`). One retry per `wait`, counted in `retries()`
    and logged. s3fs's own timeouts (5 s to connect, 15 s without a byte read) turn a frozen server
    into errors here, and botocore and s3fs retry a request a few times before it gets here; this
    is what outlasts an outage of minutes. `clock` and `sleep` are replaceable, so that tests check
    the waits asked for rather than time them."""

    def __init__(self, what: str, budget_s: float | None = None, first_s: float = 0.25, cap_s: float = 8.0, *,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.what, self.first_s, self.cap_s = what, first_s, cap_s
        self.budget_s = retry_budget_s() if budget_s is None else budget_s
        self.clock, self.sleep = clock, sleep
        self.failing_since: float | None = None
        self.attempt = 0

    def progressed(self) -> None:
        self.failing_since, self.attempt = None, 0

    def wait(self, exc: Exception) -> None:
        """Sleep before the next try; GaveUp (from `exc`) once the budget is spent."""
        global _retried
        now = self.clock()
        if self.failing_since is None:
            self.failing_since = now
        left = self.budget_s - (now - self.failing_since)
        if left <= 0:
            raise GaveUp(f"{self.what}: still failing after {now - self.failing_since:.0f} s and {self.attempt} "
                         f"retries ({RETRY_ENV}={self.budget_s:g}): {type(exc).__name__}: {exc}") from exc
        delay = min(left, min(self.cap_s, self.first_s * 2**self.attempt) * (0.5 + random.random()))
        self.attempt += 1
        with _retried_lock:
            _retried += 1
            total = _retried
        log.warning("%s failed (%s: %s); retry %d in %.1fs (%d retries in this process)",
                    self.what, type(exc).__name__, exc, self.attempt, delay, total)
        self.sleep(delay)


def open_with_retries(url: str, mode: str = "rb", budget_s: float | None = None, **kwargs):
    """`fs.open` retried on transient errors (`Retries`; s3fs retries single reads itself)."""
    fs, path = filesystem(url)
    retry = Retries(f"opening {url}", budget_s)
    while True:
        try:
            return fs.open(path, mode, **kwargs)
        except PERMANENT_ERRORS:
            raise
        except Exception as exc:  # botocore/aiohttp errors do not share one base class
            retry.wait(exc)


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    # Shards are read front to back: a large read-ahead block keeps request count low.
    return open_with_retries(url, mode, block_size=16 * 2**20, cache_type="readahead")


def register_webdataset_schemes() -> None:
    """Teach webdataset's `gopen` to read `s3://` through fsspec (it has no handler of its own).

    Idempotent and cheap; the stream calls it again inside each DataLoader worker so that
    workers started with `spawn` (which do not inherit the parent's registration) work too.
    """
    from webdataset.gopen import gopen_schemes  # the module, not the same-named function

    for scheme in ("s3", "s3a"):
        gopen_schemes[scheme] = _gopen_fsspec
