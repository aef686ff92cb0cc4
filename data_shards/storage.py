"""Where shards live: fsspec URLs (`file://`, plain paths, `s3://`) and webdataset's opener for them.

S3 settings come from the standard AWS variables plus `AWS_ENDPOINT_URL` for S3-compatible
servers (moto, MinIO, Ceph). Filesystem instances are cached by fsspec itself: its cache key
includes the process id (and the thread), so a forked DataLoader worker gets fresh s3fs
instances instead of sharing the parent's event loop and connections.

Failures are sorted where they arise: `is_transient` says which errors a retry can outlast (a
connection refused or reset, a timeout, a 5xx, throttling), and `storage_problem` turns the
others a user can fix (no credentials, a bucket that does not exist, access denied, an endpoint
nobody answers, a scheme whose filesystem is not installed) into one line naming the thing and
the fix. `Retries` retries only the transient ones: the rest fail at once.
"""
from __future__ import annotations

import errno
import logging
import os
import random
import threading
import time
from typing import Any, Callable

import fsspec

from .endpoint import unanswered
from .errors import EnvironmentProblem, InputNotFound, UserError, environment_problem

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
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as e:   # fsspec knows the scheme, but its package is not installed
        raise MissingFilesystem(f"{url}: no filesystem for {protocol}:// is installed here ({e}); install "
                                f"{_package_for(protocol)} (e.g. pip install {_package_for(protocol)})") from None
    except ValueError as e:
        if str(protocol) not in fsspec.available_protocols():   # fsspec: "Protocol not known: x"
            raise UserError(f"{url}: unknown URL scheme {protocol}://; use a local path, s3:// or another "
                            "scheme fsspec knows") from None
        raise
    return fs, path


class MissingFilesystem(EnvironmentProblem):
    """The URL's scheme is known to fsspec but the package that reads it is not installed."""


def _package_for(protocol: str | None) -> str:
    """The package that implements `protocol`, from fsspec's registry ("gcsfs" for gs)."""
    from fsspec.registry import known_implementations

    spec = known_implementations.get(str(protocol), {})
    return spec.get("class", "").split(".", 1)[0] or f"the fsspec implementation of {protocol}://"


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


# Missing objects and refused permissions are never transient; `is_transient` decides the rest.
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, EnvironmentProblem,
                    UserError)

# errnos of a network or a server that may come back (s3fs turns a 500 into EREMOTEIO, a 503 or
# SlowDown into EBUSY, codes it does not know into EIO).
_TRANSIENT_ERRNOS = {getattr(errno, name) for name in (
    "ECONNRESET", "ECONNREFUSED", "ECONNABORTED", "ETIMEDOUT", "EHOSTUNREACH", "ENETUNREACH", "ENETDOWN",
    "ENETRESET", "EPIPE", "EAGAIN", "EBUSY", "EIO", "EREMOTEIO") if hasattr(errno, name)}
_UNREACHABLE_ERRNOS = {getattr(errno, name) for name in ("ENETUNREACH", "EHOSTUNREACH", "ENETDOWN", "ECONNREFUSED")
                       if hasattr(errno, name)}
_TRANSIENT_S3_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "Throttling", "ThrottlingException",
                       "RequestTimeout", "RequestTimeoutException", "RequestLimitExceeded", "503", "500", "502", "504"}


def _chain(exc: BaseException):
    """`exc` and the errors it was raised from (`raise ... from`: s3fs keeps botocore's ClientError
    as the cause). Not the error being handled when it was raised (`__context__`): a bug raised
    while handling a missing bucket is still a bug."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen and len(seen) < 16:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__


def _s3_error(exc: BaseException) -> dict:
    """The `Error` part of a botocore ClientError's response (in `exc` or the errors it was raised
    from: s3fs keeps it as the cause), e.g. {"Code": "NoSuchBucket", "BucketName": "x"}; else {}."""
    for e in _chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict) and isinstance(response.get("Error"), dict):
            return response["Error"]
    return {}


def _s3_code(exc: BaseException) -> str | None:
    """The S3 error code of a botocore ClientError (or of the error it caused), else None."""
    code = _s3_error(exc).get("Code")
    return None if code is None else str(code)


def s3_error_code(exc: BaseException) -> str | None:
    """The S3 error code behind `exc` ("PreconditionFailed", "NoSuchBucket", ...), also when s3fs
    raised its own OSError from botocore's ClientError; None when `exc` is no S3 answer."""
    return _s3_code(exc)


def is_transient(exc: BaseException) -> bool:
    """Whether another try may succeed: a connection refused, reset or timed out, an endpoint
    down, a 5xx or throttling answer. Nothing else: missing credentials, invalid or missing
    buckets, refused access, full disks, anything that parsed badly and bugs fail at once, since
    retrying them only delays the error."""
    if isinstance(exc, PERMANENT_ERRORS):
        return False
    code = _s3_code(exc)
    if code is not None:
        return code in _TRANSIENT_S3_CODES
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    import http.client

    if isinstance(exc, http.client.HTTPException):   # IncompleteRead, a bad status line mid-outage
        return True
    botocore_exceptions = _module("botocore.exceptions")
    if botocore_exceptions is not None and isinstance(exc, (
            botocore_exceptions.HTTPClientError, botocore_exceptions.ConnectionError,
            botocore_exceptions.IncompleteReadError)):
        return True   # connection closed, read or connect timeouts, an endpoint down (it may come back)
    aiohttp = _module("aiohttp")
    if aiohttp is not None:
        if isinstance(exc, aiohttp.ClientResponseError):
            return exc.status >= 500 or exc.status in (408, 429)
        if isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)):
            return True
    return False


def _module(name: str):
    """`name` when some code already imported it (its errors cannot occur otherwise), else None."""
    import sys

    return sys.modules.get(name)


def storage_problem(exc: BaseException, what: str | None = None) -> Exception | None:
    """`exc` as the error a user can fix, naming `what` (a URL) and the fix: an EnvironmentProblem
    (missing credentials, access denied, an endpoint nobody answers, a full or read-only disk), an
    InputNotFound for a bucket that does not exist, a UserError for an invalid bucket name;
    None when it is none of these (transient, or a bug). The errors made here also carry the fix
    alone, as `fix`, for reports that show it on a line of its own (`orbitgen doctor`)."""
    disk = environment_problem(exc, what)
    if disk is not None:
        return disk
    if isinstance(exc, (UserError, EnvironmentProblem)):
        return exc
    subject = f"{what}: " if what else ""
    botocore_exceptions = _module("botocore.exceptions")
    if botocore_exceptions is not None:
        for e in _chain(exc):
            if isinstance(e, (botocore_exceptions.NoCredentialsError, botocore_exceptions.PartialCredentialsError)):
                fix = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, for this S3 store"
                return _fixable(EnvironmentProblem, f"{subject}no AWS credentials found ({e}); {fix}", fix)
            if isinstance(e, botocore_exceptions.ParamValidationError):   # refused before sending: a bad name
                bucket = _bucket_of(what)
                said = f"{bucket!r} is not a valid bucket name" if bucket else " ".join(str(e).split())[:160]
                return _fixable(UserError, f"{subject}{said} (a bucket name has 3-63 lower-case letters, digits, dots "
                                           "and hyphens)", BUCKET_NAMES)
            if isinstance(e, botocore_exceptions.EndpointConnectionError):
                fix = "check AWS_ENDPOINT_URL and the network, or try again when the store is back"
                return _fixable(EnvironmentProblem, f"{subject}the S3 endpoint does not answer ({e}); {fix}", fix)
    if isinstance(exc, ConnectionError) or (isinstance(exc, OSError) and exc.errno in _UNREACHABLE_ERRNOS):
        said = " ".join(str(exc).split()) or type(exc).__name__
        fix = "check the network and that the server is up, then try again"
        return _fixable(EnvironmentProblem, f"{subject}{said}; {fix}", fix)
    code = _s3_code(exc)
    bucket = _bucket_of(what) or _s3_error(exc).get("BucketName")
    if code == "NoSuchBucket":
        fix = "create it or name an existing one"
        return _fixable(InputNotFound, f"{subject}the bucket {bucket!r} does not exist; {fix}", fix)
    if code == "InvalidBucketName":
        return _fixable(UserError, f"{subject}{bucket!r} is not a valid bucket name (3-63 lower-case letters, digits, "
                                   "dots and hyphens)", BUCKET_NAMES)
    if code in ("AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                "403"):
        fix = f"check the AWS credentials in use and that they may read and write bucket {bucket!r}"
        return _fixable(EnvironmentProblem, f"{subject}access denied ({code}); {fix}", fix)
    return None


BUCKET_NAMES = "name a bucket of 3-63 lower-case letters, digits, dots and hyphens"


def _fixable(kind: type[Exception], message: str, fix: str) -> Exception:
    """`kind(message)` with `fix` (the part of the message that says what to do) kept as `fix`."""
    problem = kind(message)
    problem.fix = fix
    return problem


def _bucket_of(url: str | None) -> str | None:
    if not url or "://" not in str(url):
        return None
    return str(url).split("://", 1)[1].split("/", 1)[0] or None


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


class GaveUp(EnvironmentProblem):
    """Reading failed with transport errors for longer than the retry budget (an IOError, as
    before: an EnvironmentProblem is one)."""


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
        """Sleep before the next try; GaveUp (from `exc`) once the budget is spent. An error no
        retry can outlast (`is_transient`) is raised at once: as the one-line error a user can
        fix when it is one (`storage_problem`), else as it is."""
        global _retried
        if not is_transient(exc):
            problem = storage_problem(exc, self.what)
            if problem is None or problem is exc:
                raise exc
            raise problem from exc
        now = self.clock()
        if self.failing_since is None:
            self.failing_since = now
        left = self.budget_s - (now - self.failing_since)
        if left <= 0:
            raise GaveUp(f"{self.what}: still failing after {now - self.failing_since:.0f} s and {self.attempt} "
                         f"retries ({RETRY_ENV}={self.budget_s:g}): {type(exc).__name__}: {exc}; check that the "
                         f"store and the network are up, or give outages longer with {RETRY_ENV}") from exc
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
