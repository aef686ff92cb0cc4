"""The retry policy of reads from storage (storage.Retries): capped backoff for a bounded time,
counted; against a real HTTP server on loopback that is down, then up (tests/integration/
test_faults_storage.py does the same with the S3 server and training)."""
from __future__ import annotations

import functools
import http.server
import socket
import threading
import time

import pytest
from test_data_helpers import crater_keys, write_craters

from data_shards import storage
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


def test_backoff_is_capped_and_gives_up_once_the_budget_is_spent():
    retry = Retries("reading x", budget_s=1.5, first_s=0.05, cap_s=0.2)
    before, started, waits = storage.retries(), time.monotonic(), []
    with pytest.raises(GaveUp, match=r"reading x: still failing after 2 s and \d+ retries .*ConnectionRefusedError"):
        while True:
            t = time.monotonic()
            retry.wait(ConnectionRefusedError("refused"))
            waits.append(time.monotonic() - t)
    assert 1.5 <= time.monotonic() - started < 2.0
    assert max(waits) <= 0.2 * 1.5 + 0.05          # the cap (with its jitter)
    assert waits[0] < 0.1 and waits[-2] > 0.09     # exponential from first_s up to the cap
    assert storage.retries() - before == len(waits) == retry.attempt


def test_progress_starts_the_budget_again():
    retry = Retries("reading x", budget_s=0.3, first_s=0.05, cap_s=0.05)
    for _ in range(3):   # 0.9 s of failures in all, never 0.3 s without progress
        for _ in range(3):
            retry.wait(TimeoutError())
        retry.progressed()


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


def test_a_server_down_longer_than_the_budget_fails_naming_the_shard():
    url = f"http://127.0.0.1:{closed_port()}/set/shard-000003.tar"
    started = time.monotonic()
    with pytest.raises(ShardReadError, match=r"cannot read shard .*shard-000003\.tar: .*still failing after 1 s"):
        list(read_piece(url, budget_s=1.0))
    assert time.monotonic() - started < 5
