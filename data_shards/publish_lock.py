"""One build at a time publishes into a shard set's folder: `publish_lock`, on a local disk and on S3.

Publishing moves a staged set into its folder after checking that no other build finished there
meanwhile (data_shards/writer.py). Two builds that both passed that check would mix their files,
so the check and the moves run under a lock that one build holds at a time:

- a local folder: a lock file made with O_EXCL. It holds "HOST PID" (jobs/generate.py reads that
  to clear a lock whose process is gone).
- S3: a lock object made by a conditional PUT (`If-None-Match: *`, which S3 has kept since 2024,
  as MinIO and moto do). The store keeps the first PUT and answers every later one 412
  PreconditionFailed: deciding and writing are one step, so no two builders both win. The object
  is a lease (holder, seconds, expiry), so a builder that died does not block the folder for
  ever. Whether it ran out is judged by the store's clock (the object's Last-Modified against the
  Date of the answer), never by two machines' clocks against each other. A lease that ran out is
  taken over by a PUT conditional on its ETag (`If-Match`): of two waiters, one wins. The holder
  renews its lease while it publishes (every third of the lease), and removes the object on the
  same condition, so it never removes the lock of a builder that took over after it.
- a store that refuses conditional writes (501 NotImplemented): no lock. A warning says so, and
  publishing goes on as before (the manifest's single PUT, last, is what makes a set visible).
- other filesystems (memory://, ...): no lock, as before.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from typing import Iterator, NoReturn

from .errors import InputExists
from .storage import s3_error_code, storage_problem

log = logging.getLogger(__name__)

LEASE_S = 30.0   # renewed every third of it: only a builder that stopped lets its lease run out
# Answers that mean "the condition did not hold": another holds the lock, or won the race to it.
_LOST_RACE = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey", "404"}
_UNSUPPORTED = {"NotImplemented", "501"}   # a store without conditional writes


@contextmanager
def publish_lock(dest: str, fs, root: str, *, name: str, wait_s: float, poll_s: float,
                 lease_s: float = LEASE_S) -> Iterator[None]:
    """Hold the publish lock of the set at `dest` (`root` inside `fs`) for the block: the lock file
    or object `name` in that folder. Waits for another holder up to `wait_s` (on S3 also until a
    stopped builder's lease ran out: at least 1.5 `lease_s`), polling every `poll_s`; then refuses
    with `InputExists`, one line naming the folder, the holder and what to do."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        with _local_lock(dest, os.path.join(root, name), wait_s, poll_s):
            yield
    elif _is_s3(fs):
        with _object_lock(dest, fs, f"{root.rstrip('/')}/{name}", wait_s, poll_s, lease_s):
            yield
    else:
        yield


def _is_s3(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "s3" in protocols


@contextmanager
def _local_lock(dest: str, lock: str, wait_s: float, poll_s: float) -> Iterator[None]:
    for _ in range(max(1, int(wait_s / poll_s))):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            time.sleep(poll_s)
    else:
        raise InputExists(f"{dest}: another build has been publishing there for {wait_s:.0f} s ({lock} "
                          "exists); if no build runs, remove that file")
    try:
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        os.close(fd)
        yield
    finally:
        os.unlink(lock)


@dataclass
class Held:
    """The lock object as another builder left it: who, its ETag, how long ago the store last
    wrote it and for how long its lease runs (both by the store's clock)."""
    holder: str
    etag: str
    age_s: float
    lease_s: float

    @property
    def ran_out(self) -> bool:
        return self.age_s > self.lease_s


class ObjectLock:
    """The lock object of one acquisition on S3: its conditional writes, its renewal, its release."""

    def __init__(self, dest: str, fs, path: str, lease_s: float):
        self.dest, self.fs, self.lease_s = dest, fs, lease_s
        self.bucket, self.key, _ = fs.split_path(path)
        self.url = fs.unstrip_protocol(path)
        # A random part per acquisition: two containers can share a host name and a pid.
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self.etag: str | None = None
        self.seen: Held | None = None     # the other holder, last time it was read
        self.lost = threading.Event()     # another builder took the lock over (our lease ran out)
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def take(self) -> bool | None:
        """One try: True when this builder now holds the lock, False when another holds it (a live
        lease), None when the store refuses conditional writes."""
        try:
            self.etag = self._put(IfNoneMatch="*")
            return True
        except Exception as e:   # botocore and s3fs errors share no base class
            code = s3_error_code(e)
            if code in _UNSUPPORTED:
                return None
            if code not in _LOST_RACE:
                self._fail(e)
        return self._take_over_if_ran_out()

    def _take_over_if_ran_out(self) -> bool:
        try:
            self.seen = self._read()
        except FileNotFoundError:   # released meanwhile: the next try takes it
            return False
        if not self.seen.ran_out:
            return False
        try:
            self.etag = self._put(IfMatch=self.seen.etag)
        except Exception as e:
            if s3_error_code(e) in _LOST_RACE or isinstance(e, FileNotFoundError):
                return False   # another waiter took it over first, or its holder released it
            self._fail(e)
        log.warning("%s: took over the publish lock %s from %s, whose lease ran out %.0f s ago (a build that "
                    "stopped)", self.dest, self.url, self.seen.holder, self.seen.age_s - self.seen.lease_s)
        return True

    def _put(self, **condition) -> str:
        expires = datetime.now(timezone.utc) + timedelta(seconds=self.lease_s)
        body = json.dumps({"holder": self.holder, "dest": self.dest, "lease_s": self.lease_s,
                           "expires": expires.isoformat(timespec="seconds")}).encode()
        answer = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=body,
                                 ContentType="application/json", **condition)
        return answer["ETag"]

    def _read(self) -> Held:
        from fsspec.asyn import sync

        async def get():
            answer = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            try:
                return answer, await answer["Body"].read()
            finally:
                answer["Body"].close()

        answer, data = sync(self.fs.loop, get)
        server_now = parsedate_to_datetime(answer["ResponseMetadata"]["HTTPHeaders"]["date"])
        try:
            lease = json.loads(data)
            holder, lease_s = str(lease["holder"]), float(lease["lease_s"])
        except (ValueError, KeyError, TypeError):   # not our lease (a person's file?): the default lease
            holder, lease_s = "unknown (the lock object does not say)", LEASE_S
        return Held(holder, answer["ETag"], (server_now - answer["LastModified"]).total_seconds(), lease_s)

    def _fail(self, e: Exception) -> NoReturn:
        """Raise a failed write of the lock as the one-line error a user can fix (no credentials,
        access denied, ...), naming the lock object; else as it is."""
        problem = storage_problem(e, self.url)
        if problem is None or problem is e:
            raise e
        raise problem from e

    def start_renewing(self) -> None:
        self._renewer = threading.Thread(target=self._renew, name=f"renew {self.url}", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                self.etag = self._put(IfMatch=self.etag)
            except Exception as e:
                if s3_error_code(e) in _LOST_RACE or isinstance(e, FileNotFoundError):
                    self.lost.set()
                    log.warning("%s: the publish lock %s was taken over by another build (this build's lease ran "
                                "out); check the set with `orbitgen data verify`", self.dest, self.url)
                    return
                # A failed renewal is not lost yet: two thirds of the lease are left for the next one.
                log.warning("%s: could not renew the publish lock %s (%s: %s); trying again", self.dest, self.url,
                            type(e).__name__, e)

    def release(self) -> None:
        """Remove the lock object if it is still this builder's (conditional on its ETag). A failure
        is a warning, not an error: the set is published or not already, and the lease runs out."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=30)
        if self.lost.is_set():
            return
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
        except Exception as e:
            code = s3_error_code(e)
            if code in _UNSUPPORTED:   # no conditional deletes: ours unless its holder changed
                self._release_if_ours()
            elif code in _LOST_RACE or isinstance(e, FileNotFoundError):
                log.warning("%s: the publish lock %s was taken over by another build before this one released it",
                            self.dest, self.url)
            else:
                log.warning("%s: could not remove the publish lock %s (%s: %s); it runs out by itself in %.0f s",
                            self.dest, self.url, type(e).__name__, e, self.lease_s)
        self.fs.invalidate_cache(f"{self.bucket}/{self.key}")

    def _release_if_ours(self) -> None:
        try:
            if self._read().etag == self.etag:
                self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key)
        except FileNotFoundError:
            pass


@contextmanager
def _object_lock(dest: str, fs, path: str, wait_s: float, poll_s: float, lease_s: float) -> Iterator[None]:
    lock = ObjectLock(dest, fs, path, lease_s)
    waited_s = max(wait_s, 1.5 * lease_s)   # long enough for a stopped builder's lease to run out
    for _ in range(max(1, int(waited_s / poll_s))):
        taken = lock.take()
        if taken is None:
            log.warning("%s: the object store refuses conditional writes (If-None-Match: 501 NotImplemented), so "
                        "nothing keeps two builds to this folder apart: publishing without a lock", dest)
            yield
            return
        if taken:
            break
        time.sleep(poll_s)
    else:
        who = f" ({lock.seen.holder})" if lock.seen else ""
        raise InputExists(f"{dest}: another build{who} has been publishing there for {waited_s:.0f} s and keeps its "
                          f"lease ({lock.url}); wait for it and build again, or, if no build runs, remove that object")
    lock.start_renewing()
    try:
        fs.invalidate_cache(path.rsplit("/", 1)[0])   # s3fs lists from a cache: see what others published meanwhile
        yield
    finally:
        lock.release()
