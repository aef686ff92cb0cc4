"""The buffering run logger on real stores: a sqlite MLflow store stands for the server that
answers, an address nobody listens on for the one gone away. Records keep their order, steps and
timestamps; what the server did not take waits in the run's storage and is replayed once."""
from __future__ import annotations

import shutil
import threading
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST
from mlflow.tracking import MlflowClient

from jobs.tracking import buffered
from jobs.tracking.runs import RunLogger

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "infra"))
from local_stack import free_port  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module (creating one takes seconds); each test has its own run."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_experiment("buffer", artifact_location=tmp_path_factory.mktemp("artifacts").as_uri())
    return uri, client


def _run(store) -> str:
    uri, client = store
    return client.create_run(client.get_experiment_by_name("buffer").experiment_id).info.run_id


def _log_some(log: RunLogger) -> int:
    """Five steps of metrics, params and an image; returns when logging began (ms)."""
    began = int(time.time() * 1000)
    for step in range(1, 6):
        log.metrics(step, {"loss": 1.0 / step, "kimg": step * 0.1})
    log.params({"fid_extractor": "randconv"})
    log.image(np.full((8, 8, 1), 200, np.uint8), "samples/grid.png")
    return began


def _check_run(client: MlflowClient, run_id: str, began: float, logged_by: float) -> None:
    history = client.get_metric_history(run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4, 5]
    assert [m.value for m in history] == pytest.approx([1.0, 0.5, 1 / 3, 0.25, 0.2])
    # Timestamps are when the values were logged, not when the store got them.
    assert all(began <= m.timestamp <= logged_by for m in history)
    run = client.get_run(run_id)
    assert run.data.params["fid_extractor"] == "randconv"
    assert [a.path for a in client.list_artifacts(run_id, "samples")] == ["samples/grid.png"]


def test_records_reach_the_store_in_order(store, tmp_path):
    run_id = _run(store)
    log = RunLogger(store[0], run_id, spill=buffered.pending_url((tmp_path / "run").as_uri()))
    began = _log_some(log)
    logged_by = time.time() * 1000
    assert log.close(timeout=30) == 0
    _check_run(store[1], run_id, began, logged_by)
    assert not (tmp_path / "run" / buffered.PENDING).exists()   # nothing was kept: nothing failed


def test_records_the_server_missed_wait_in_storage_and_are_replayed_once(store, tmp_path):
    run_id = _run(store)
    run_storage = (tmp_path / "run").as_uri()
    away = f"http://127.0.0.1:{free_port()}"   # nobody answers there
    log = RunLogger(away, run_id, spill=buffered.pending_url(run_storage))
    began = _log_some(log)
    logged_by = time.time() * 1000
    assert log.close(timeout=2) == 7
    kept = sorted((tmp_path / "run" / buffered.PENDING).iterdir())
    assert len(kept) == 7
    assert [buffered.Record.from_json(p.name, p.read_bytes()).kind for p in kept] == ["metrics"] * 5 + ["params", "image"]
    copies = tmp_path / "copies"
    shutil.copytree(kept[0].parent, copies)

    # The driver, once the server answers: everything arrives as logged, and the folder goes.
    assert buffered.replay(store[1], run_id, run_storage) == 7
    _check_run(store[1], run_id, began, logged_by)
    assert not (tmp_path / "run" / buffered.PENDING).exists()

    # The same records again (a worker that died after the server took them, before it removed
    # them): no metric point twice.
    shutil.copytree(copies, tmp_path / "run" / buffered.PENDING)
    assert buffered.replay(store[1], run_id, run_storage) == 7
    _check_run(store[1], run_id, began, logged_by)


@pytest.fixture
def tracking_away():
    """The current tracking URI: a server nobody answers for."""
    uri = f"http://127.0.0.1:{free_port()}"
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def test_retried_waits_for_the_server_within_one_bound(store, tracking_away, monkeypatch):
    monkeypatch.setenv(buffered.RETRY_ENV, "2")
    away = MlflowClient(tracking_away)
    t0 = time.monotonic()
    with pytest.raises(buffered.TrackingUnavailable, match="no answer for"):
        buffered.retried(away.get_run, "0" * 32)
    assert 2 <= time.monotonic() - t0 < 10
    # The next call in a row shares the bound: one try, not another wait.
    t0 = time.monotonic()
    with pytest.raises(buffered.TrackingUnavailable):
        buffered.retried(away.set_terminated, "0" * 32, "FINISHED")
    assert time.monotonic() - t0 < 2


def test_retried_does_not_retry_refusals_nor_local_stores(store):
    # A local store cannot go away; a request refused would be refused again.
    mlflow.set_tracking_uri(store[0])
    try:
        t0 = time.monotonic()
        with pytest.raises(MlflowException, match="not found|does not exist|No run"):
            buffered.retried(store[1].get_run, "f" * 32)
        assert time.monotonic() - t0 < 2
    finally:
        mlflow.set_tracking_uri(None)
    assert not buffered.transient(MlflowException("no such run", error_code=RESOURCE_DOES_NOT_EXIST))
    assert buffered.transient(MlflowException("API request failed: Connection refused"))   # what a dead server gives
    assert not buffered.transient(FileNotFoundError("gone"))
    assert buffered.transient(ConnectionRefusedError())


class FakeServer:
    """A client whose server hangs (`hang`: each call waits until released, as a 30 s request
    does), refuses connections (`away`) or takes everything; it keeps what it took, in order."""

    def __init__(self):
        self.hang, self.away = threading.Event(), False
        self.released = threading.Event()
        self.took: list = []

    def log_batch(self, run_id, metrics=(), params=()):
        if self.hang.is_set():
            self.released.wait(timeout=30)
        if self.away:
            raise ConnectionRefusedError(111, "Connection refused")
        self.took.extend([("metric", m.key, m.step) for m in metrics] + [("param", p.key) for p in params])

    def get_metric_history(self, run_id, key):
        return []


def _wait(condition, seconds: float = 10) -> bool:
    for _ in range(int(seconds / 0.02)):   # bounded polling
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_put_does_not_wait_for_a_server_that_hangs():
    """The old put() sent while the queue was empty, holding its lock, for up to 30 s a call."""
    server = FakeServer()
    server.hang.set()
    buf = buffered.RecordBuffer(server, "run", spill=None)
    try:
        t0 = time.monotonic()
        for step in range(1, 4):
            buf.put("metrics", [["loss", 1.0 / step, 1000 + step, step]])
        assert time.monotonic() - t0 < 0.5   # while the first send hangs
    finally:
        server.released.set()
    assert buf.close(timeout=10) == 0
    assert server.took == [("metric", "loss", 1), ("metric", "loss", 2), ("metric", "loss", 3)]


def test_records_kept_in_storage_leave_memory_and_are_sent_from_there(tmp_path):
    """The old queue kept every record (grids included) in memory for the whole outage."""
    server = FakeServer()
    server.away = True
    spill = (tmp_path / buffered.PENDING).as_uri()
    buf = buffered.RecordBuffer(server, "run", spill=spill)
    big = "x" * 200_000   # a grid's worth of base64
    for step in range(1, 21):
        buf.put("params", {f"p{step}": big})
    assert _wait(lambda: len(list((tmp_path / buffered.PENDING).glob("*.json"))) == 20)
    assert _wait(lambda: all(r.data is None for r in list(buf.queue)))   # stored: out of memory
    assert buf.in_memory() == 0 and len(buf.queue) == 20
    server.away = False   # back: read from storage, sent in order, files removed
    assert buf.close(timeout=20) == 0
    assert server.took == [("param", f"p{step}") for step in range(1, 21)]
    assert not list((tmp_path / buffered.PENDING).glob("*"))


def test_replay_leaves_out_a_damaged_file_and_says_so(store, tmp_path, caplog):
    """The old replay failed on a file cut short, after training and on every --resume."""
    run_id = _run(store)
    run_storage = (tmp_path / "run").as_uri()
    log = RunLogger(f"http://127.0.0.1:{free_port()}", run_id, spill=buffered.pending_url(run_storage))
    _log_some(log)
    assert log.close(timeout=2) == 7
    kept = sorted((tmp_path / "run" / buffered.PENDING).iterdir())
    kept[2].write_bytes(kept[2].read_bytes()[:20])   # step 3's metrics, cut short
    (kept[0].parent / f".{kept[0].name}.0123.partial").write_bytes(b'{"ki')   # a write a crash cut short
    with caplog.at_level("WARNING", logger="jobs.tracking.buffered"):
        assert buffered.replay(store[1], run_id, run_storage) == 6
    assert kept[2].name in caplog.text and "did not read whole" in caplog.text
    assert [m.step for m in store[1].get_metric_history(run_id, "loss")] == [1, 2, 4, 5]
    assert sorted(p.name for p in kept[0].parent.iterdir()) == [kept[2].name + ".damaged"]
    assert buffered.replay(store[1], run_id, run_storage) == 0   # the next --resume goes through
