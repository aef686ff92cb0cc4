"""The publish lock (data_shards/publish_lock.py) without a server: on a local disk one holder at a
time, a holder past the wait refused in one line, the lock gone after the block whatever happened
in it; a store that refuses conditional writes publishes without a lock and says so once; the fix
of a store's error kept apart for `orbitgen doctor`; a sample's error not blamed on the store.
The S3 lock itself runs against the loopback server in tests/integration/test_s3_publish_lock.py."""
from __future__ import annotations

import logging
import os
import socket
import threading
import time

import numpy as np
import pytest
from botocore.exceptions import ClientError, NoCredentialsError

from data_shards import storage
from data_shards.errors import EnvironmentProblem, InputExists, InputNotFound
from data_shards.publish_lock import publish_lock
from data_shards.sources import Sample
from data_shards.storage import filesystem
from data_shards.writer import LOCK, write_shards


def held(folder, **kw):
    fs, root = filesystem(str(folder))
    return publish_lock(str(folder), fs, root, **{"name": LOCK, "wait_s": 5.0, "poll_s": 0.01, **kw})


def test_one_build_at_a_time_holds_the_local_lock(tmp_path):
    inside, overlaps = [0], []

    def build():
        with held(tmp_path):
            inside[0] += 1
            overlaps.append(inside[0])
            time.sleep(0.05)   # long enough for the other thread to try meanwhile
            inside[0] -= 1

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert overlaps == [1, 1, 1] and not (tmp_path / LOCK).exists()


def test_the_lock_file_names_host_and_pid(tmp_path):
    with held(tmp_path):   # jobs/generate.py reads these two to clear a lock whose process is gone
        assert (tmp_path / LOCK).read_text().split() == [socket.gethostname(), str(os.getpid())]


def test_a_lock_held_past_the_wait_is_refused_in_one_line(tmp_path):
    with held(tmp_path):
        start = time.monotonic()
        with pytest.raises(InputExists) as e:
            with held(tmp_path, wait_s=0.2):
                pass
        assert time.monotonic() - start < 2
    message = str(e.value)
    assert "\n" not in message and str(tmp_path) in message and LOCK in message and "remove that file" in message


def test_the_lock_goes_when_the_block_fails(tmp_path):
    with pytest.raises(RuntimeError):
        with held(tmp_path):
            raise RuntimeError("publishing broke")
    assert not (tmp_path / LOCK).exists()


class RefusingStore:
    """An S3 filesystem as publish_lock sees it, whose store answers conditional writes 501."""
    protocol = ("s3", "s3a")

    def __init__(self):
        self.calls = []

    def split_path(self, path):
        bucket, key = path.split("/", 1)
        return bucket, key, None

    def unstrip_protocol(self, path):
        return f"s3://{path}"

    def call_s3(self, method, **kw):
        self.calls.append((method, kw))
        raise OSError(38, "Not implemented") from ClientError(
            {"Error": {"Code": "NotImplemented", "Message": "A header you provided implies functionality that is "
                                                            "not implemented"}}, "PutObject")


def test_a_store_without_conditional_writes_publishes_without_a_lock_and_says_so(caplog):
    store, ran = RefusingStore(), []
    with caplog.at_level(logging.WARNING, logger="data_shards.publish_lock"):
        with publish_lock("s3://b/set", store, "b/set", name=LOCK, wait_s=5.0, poll_s=0.01):
            ran.append(True)
    assert ran == [True] and len(store.calls) == 1 and store.calls[0][1]["IfNoneMatch"] == "*"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "refuses conditional writes" in lines[0] and "s3://b/set" in lines[0]


def test_a_stores_error_keeps_its_fix_apart():
    problem = storage.storage_problem(NoCredentialsError(), "s3://b/set")
    assert isinstance(problem, EnvironmentProblem) and "AWS_ACCESS_KEY_ID" in problem.fix
    assert str(problem) == f"s3://b/set: no AWS credentials found (Unable to locate credentials); {problem.fix}"
    missing = storage.storage_problem(OSError(2, "no bucket").with_traceback(None), "s3://nb/set")
    assert missing is None   # no S3 code: not a store's answer
    cause = ClientError({"Error": {"Code": "NoSuchBucket", "BucketName": "nb"}}, "PutObject")
    try:   # as s3fs raises it: its own OSError, botocore's answer as the cause
        raise FileNotFoundError("The specified bucket does not exist") from cause
    except FileNotFoundError as raised:
        error = raised
    missing = storage.storage_problem(error, "s3://nb/set")
    assert isinstance(missing, InputNotFound) and str(missing).endswith(f"; {missing.fix}")
    assert storage.s3_error_code(error) == "NoSuchBucket" and storage.s3_error_code(OSError(5, "x")) is None


def test_a_samples_error_is_not_blamed_on_the_destination():
    """A source on S3 without credentials fails while the shard is written to an object store: the
    error stays the source's (it does not name the destination)."""
    def samples():
        yield Sample(key="a", image=np.zeros((4, 4, 1), np.uint8), meta={})
        raise NoCredentialsError()

    with pytest.raises(NoCredentialsError):
        write_shards(samples(), "memory://publish-lock-test/set", layout="x", resolution=4, channels=1,
                     source="t", progress=False)


def test_a_build_started_while_another_publishes_waits_for_it_instead_of_calling_it_cut_short(tmp_path, monkeypatch):
    from data_shards import writer

    def samples():
        return [Sample(key=f"s{i}", image=np.full((8, 8, 1), i, np.uint8), meta={}) for i in range(4)]

    def build():
        return write_shards(samples(), str(tmp_path / "set"), layout="t", resolution=8, channels=1, source="t",
                            shard_samples=2, progress=False)

    real_mv, first_moved, go_on = writer.publish, threading.Event(), threading.Event()

    def halting_publish(fs, staged, root, names):   # the first file in place, then a pause mid-publish
        real_mv(fs, staged, root, names[:1])
        first_moved.set()
        go_on.wait(10)
        real_mv(fs, staged, root, names[1:])

    monkeypatch.setattr(writer, "publish", halting_publish)
    first: dict = {}
    t = threading.Thread(target=lambda: first.update(card=build()))
    t.start()
    assert first_moved.wait(10)
    monkeypatch.setattr(writer, "publish", real_mv)
    threading.Timer(0.3, go_on.set).start()
    second = build()   # saw part of a set; waits for the lock, then finds the same set whole
    t.join(10)
    assert second.fingerprint == first["card"].fingerprint
