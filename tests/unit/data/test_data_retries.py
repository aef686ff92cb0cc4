"""The retry policy of reads from storage (storage.Retries): capped backoff for a bounded time,
counted; against a real HTTP server on loopback that is down, then up (tests/integration/
test_faults_storage.py does the same with the S3 server and training). The waits are checked as
asked of a fake clock, not timed: a loaded machine sleeps longer than asked."""
from __future__ import annotations

import functools
import http.server
import socket
import threading
import time

import pytest
from shard_helpers import crater_keys, write_craters

from data_shards import shard_reader, storage
from data_shards.shard_reader import ShardReadError, read_piece
from data_shards.storage import GaveUp, Retries


def closed_port() -> int:
    """A loopback port nobody listens on: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_later(folder, port: int, after_s: float) -> http.server.ThreadingHTTPServer:
    """Serves `folder` over HTTP on `port`, from `after_s` seconds from now on: a server coming back."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    box: list[http.server.ThreadingHTTPServer] = []

    def start():
        time.sleep(after_s)
        box.append(http.server.ThreadingHTTPServer(("127.0.0.1", port), handler))
        box[0].serve_forever()

    threading.Thread(target=start, daemon=True).start()
    return box


class FakeTime:
    """A clock that only `sleep` moves: the waits Retries asks for, recorded, take no time."""

    def __init__(self):
        self.now, self.slept, self.asked_at = 0.0, [], []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.asked_at.append(self.now)
        # Some time passes, as in a real sleep: else a last wait of the budget's rounding error
        # (1e-17 s) can leave `now` as it was, and the budget is never spent.
        self.now += max(seconds, 1e-9)

    def retries(self, what: str, **policy) -> Retries:
        return Retries(what, clock=self.clock, sleep=self.sleep, **policy)


def test_backoff_is_capped_and_gives_up_once_the_budget_is_spent():
    t = FakeTime()
    retry = t.retries("reading x", budget_s=1.5, first_s=0.05, cap_s=0.2)
    before = storage.retries()
    with pytest.raises(GaveUp, match=r"reading x: still failing after 2 s and \d+ retries .*ConnectionRefusedError"):
        while True:
            retry.wait(ConnectionRefusedError("refused"))
    # Retry n waits first_s·2ⁿ, capped, times a jitter in [0.5, 1.5), and never past the budget.
    for n, (wait, at) in enumerate(zip(t.slept, t.asked_at)):
        base, left = min(0.2, 0.05 * 2**n), 1.5 - at
        assert min(left, 0.5 * base) <= wait <= min(left, 1.5 * base), (n, wait)
    assert t.now == pytest.approx(1.5)   # gave up once the budget was spent, not later
    assert storage.retries() - before == len(t.slept) == retry.attempt


def test_progress_starts_the_budget_again():
    t = FakeTime()
    retry = t.retries("reading x", budget_s=0.3, first_s=0.04, cap_s=0.08)
    for _ in range(4):   # at least 0.4 s of failures in all, never 0.3 s without progress
        for n in range(3):
            retry.wait(TimeoutError())
            assert retry.attempt == n + 1
        assert 0.02 <= t.slept[-3] < 0.06   # the backoff starts again from first_s too
        retry.progressed()
    assert t.now > 0.3 and len(t.slept) == 12
    # Without progress, the budget counts from the first failure after the last progress.
    since = t.now
    with pytest.raises(GaveUp, match="still failing"):
        while True:
            retry.wait(TimeoutError())
    assert t.now - since == pytest.approx(0.3)


def test_a_shard_is_read_whole_once_its_server_comes_back(tmp_path):
    write_craters(tmp_path, count=12, shard_samples=12, resolution=8)
    port = closed_port()
    servers = serve_later(tmp_path, port, after_s=2.0)
    before = storage.retries()
    try:
        samples = list(read_piece(f"http://127.0.0.1:{port}/shard-000000.tar", budget_s=60))
    finally:
        servers[0].shutdown()
    assert [s["__key__"] for s in samples] == crater_keys(12)
    assert not any("__missing__" in s for s in samples)
    assert storage.retries() > before


def test_a_server_down_longer_than_the_budget_fails_naming_the_shard(monkeypatch):
    t = FakeTime()
    monkeypatch.setattr(shard_reader, "Retries", functools.partial(Retries, clock=t.clock, sleep=t.sleep))
    url = f"http://127.0.0.1:{closed_port()}/set/shard-000003.tar"
    before = storage.retries()
    with pytest.raises(ShardReadError, match=r"cannot read shard .*shard-000003\.tar: .*still failing after 1 s"):
        list(read_piece(url, budget_s=1.0))
    assert t.now == pytest.approx(1.0)   # retried for the budget, then gave up
    assert storage.retries() - before == len(t.slept) > 1


# Only transient errors are retried: what no retry can mend fails at once, with the retry budget
# left long so that a wrong retry shows as a slow test and a wait asked of the fake clock.
def _client_error(code: str, bucket: str = "team-b") -> Exception:
    import botocore.exceptions

    return botocore.exceptions.ClientError({"Error": {"Code": code, "Message": code, "BucketName": bucket}},
                                           "GetObject")


def _not_retried(t: FakeTime, exc: Exception) -> BaseException:
    retry = t.retries("reading s3://team-b/set/shard-000000.tar", budget_s=600)
    with pytest.raises(Exception) as caught:
        retry.wait(exc)
    assert t.slept == [] and retry.attempt == 0   # no wait asked: failed at once
    return caught.value


def test_missing_credentials_fail_at_once_naming_the_url():
    import botocore.exceptions

    err = _not_retried(FakeTime(), botocore.exceptions.NoCredentialsError())
    assert isinstance(err, storage.EnvironmentProblem)
    assert "s3://team-b/set/shard-000000.tar" in str(err) and "AWS_ACCESS_KEY_ID" in str(err)


@pytest.mark.parametrize("code, kind, said", [
    ("NoSuchBucket", storage.InputNotFound, "'team-b' does not exist"),
    ("InvalidBucketName", storage.UserError, "not a valid bucket name"),
    ("AccessDenied", storage.EnvironmentProblem, "access denied"),
])
def test_bucket_errors_fail_at_once_naming_the_bucket(code, kind, said):
    err = _not_retried(FakeTime(), _client_error(code))
    assert isinstance(err, kind) and said in str(err)


@pytest.mark.parametrize("exc", [ValueError("pax record 'x' does not parse"), KeyError("size"),
                                 UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"), RuntimeError("a bug")])
def test_parse_errors_and_bugs_are_raised_as_they_are_at_once(exc):
    assert _not_retried(FakeTime(), exc) is exc


@pytest.mark.parametrize("exc", [ConnectionResetError(), TimeoutError(), _client_error("SlowDown"),
                                 _client_error("InternalError"), OSError(5, "EIO from s3fs")])
def test_transient_errors_are_still_retried(exc):
    t = FakeTime()
    retry = t.retries("reading x", budget_s=1.0)
    retry.wait(exc)
    assert len(t.slept) == 1 and storage.is_transient(exc)


def test_a_parse_error_in_a_local_shard_is_not_reread(tmp_path, monkeypatch):
    """A real shard on disk whose reading raises an error the tar reader does not classify (a
    parse error): read once, raised at once, not re-read for the retry budget."""
    write_craters(tmp_path, count=4, shard_samples=4, resolution=8)
    t = FakeTime()
    monkeypatch.setattr(shard_reader, "Retries", functools.partial(Retries, clock=t.clock, sleep=t.sleep))
    reads = []
    real = shard_reader.tar_files

    def parse_fails(f, shard):
        reads.append(shard)
        for i, member in enumerate(real(f, shard)):
            if i == 2:
                raise ValueError(f"{shard}: pax record does not parse")
            yield member

    monkeypatch.setattr(shard_reader, "tar_files", parse_fails)
    before = storage.retries()
    with pytest.raises(ValueError, match="does not parse"):
        list(read_piece(str(tmp_path / "shard-000000.tar"), budget_s=600))
    assert len(reads) == 1 and t.slept == [] and storage.retries() == before


def test_an_endpoint_that_does_not_answer_is_retried_then_gives_up_as_the_environment():
    """A store restarting is what retries are for; once the budget is spent, the error is the
    environment's (exit 1 at the CLI), naming the read and the variable that sets the budget."""
    import botocore.exceptions

    t = FakeTime()
    retry = t.retries("reading s3://b/shard-000000.tar", budget_s=1.0)
    with pytest.raises(GaveUp, match=r"reading s3://b/shard-000000\.tar: still failing .*ORBITGEN_DATA_RETRY_S") as e:
        while True:
            retry.wait(botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1/b"))
    assert len(t.slept) > 1 and isinstance(e.value, storage.EnvironmentProblem)
