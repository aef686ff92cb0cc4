"""Tracking that outlives an MLflow server gone away: nothing logged is lost, nothing twice.

Workers: `RecordBuffer` (behind `RunLogger`) queues each record (a batch of metrics, params, an
image) and a background thread sends them in logging order, so a step never waits on the server
(a send may take up to 30 s) nor on storage. When a send fails for a reason a later try can fix (no
answer, a timeout, a 5xx), the queued records are written to the run's storage
(`<storage>/<run>/mlflow-pending/`, one JSON file each, written whole under a temporary name and
renamed) and leave memory (they are read back to be sent), and the thread retries with backoff,
storing what is logged meanwhile; a record's file goes once the server has taken it. At the end a
worker waits a little for the queue to drain; what is left stays in storage (so does what a worker
that restarted had queued), and the driver replays it (`replay`) before it registers the model and
ends the run; a file that does not read whole is left out and reported, not a failure.

The driver's last calls (replay, tags, registering, promoting, ending the run) go through
`retried`: quick tries with backoff until the server has been away for `ORBITGEN_TRACKING_RETRY_S`
seconds (default 300) in all, then `TrackingUnavailable`; `Unfinished` collects what could not
be done so the driver can say it in one line.

No metric point twice: a record whose send failed may still have reached the server (a timeout
after the write), so before it is sent again the points the server already holds (same key,
step and timestamp) are left out. Params and images are the same when sent twice (same value,
same artifact path). MLflow's own HTTP retries (7, about 4 minutes a call) are turned off for
these calls: the waiting is done here, within the bound.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import tempfile
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, TypeVar

import mlflow
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from data_shards.card import write_whole
from data_shards.environ import environ_set
from data_shards.storage import filesystem, join

log = logging.getLogger(__name__)
T = TypeVar("T")

END = "end the run"                  # the last of the driver's steps (Unfinished)
PENDING = "mlflow-pending"          # under the run's storage: records the server has not taken yet
RETRY_ENV = "ORBITGEN_TRACKING_RETRY_S"
DEFAULT_RETRY_S = 300.0
MAX_BACKOFF_S = 10.0   # tries are cheap (refused at once): the server's return is seen within seconds
# One try per call, answered or not within 30 s: `retried` and the buffer do the waiting.
QUICK_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
BATCH_METRICS, BATCH_PARAMS = 1000, 100   # MLflow's log_batch limits


class TrackingUnavailable(RuntimeError):
    """The tracking server stayed away past the bound."""


def retry_bound_s() -> float:
    return float(os.environ.get(RETRY_ENV, DEFAULT_RETRY_S))


def transient(exc: BaseException) -> bool:
    """Worth another try: no answer (connection refused, reset, timeout) or a server that could
    not answer now (5xx, 429). A request the server refused (4xx) would be refused again."""
    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
    else:   # an artifact upload's HTTPError carries its response
        status = getattr(getattr(exc, "response", None), "status_code", None)
    if status is not None:
        return status >= 500 or status == 429
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    # requests' errors are OSErrors; boto's and urllib3's (artifacts on S3) are not.
    return isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in ("botocore", "urllib3", "requests")


@contextmanager
def quick_failing() -> Iterator[None]:
    """MLflow's HTTP settings for one quick try. They are read per call from the environment;
    only one thread of a process calls MLflow here (the buffer's, or the driver's)."""
    with environ_set(QUICK_ENV):
        yield


@dataclass
class Record:
    """One logging call. `data`: metrics [[key, value, timestamp_ms, step], ...]; params {key: value};
    image {"path": artifact file, "png": base64}."""

    kind: str
    data: Any                 # None once stored: read back from its file to be sent
    name: str                 # its file under PENDING; names sort in logging order
    spilled: bool = False     # written to storage
    tried: bool = False       # a send failed: it may have reached the server anyway

    def to_json(self) -> bytes:
        return json.dumps({"kind": self.kind, "data": self.data}).encode()

    @classmethod
    def from_json(cls, name: str, raw: bytes) -> "Record":
        """The record stored as `name`; `DamagedRecord` when the file is not a whole record."""
        try:
            d = json.loads(raw)
            return cls(d["kind"], d["data"], name, spilled=True, tried=True)
        except (ValueError, KeyError, TypeError) as e:   # cut short (JSONDecodeError, bad UTF-8) or not ours
            raise DamagedRecord(f"tracking record {name} is damaged ({len(raw)} bytes; {type(e).__name__}: "
                                f"{e}): cut short by a crash?") from None


class DamagedRecord(ValueError):
    """A stored record that does not read whole."""


def _held(client: MlflowClient, run_id: str, key: str) -> set[tuple[int, int]]:
    return {(m.step, m.timestamp) for m in client.get_metric_history(run_id, key)}


def deliver(client: MlflowClient, run_id: str, rec: Record, held: dict[str, set] | None = None) -> None:
    """Send one record; a record tried before sends only the metric points the server lacks.
    `held`: the points the server holds by key, as far as read (a replay reads each key once)."""
    if rec.kind == "metrics":
        points = [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in rec.data]
        if rec.tried:
            held = {} if held is None else held
            for key in {m.key for m in points} - held.keys():
                held[key] = _held(client, run_id, key)
            points = [m for m in points if (m.step, m.timestamp) not in held[m.key]]
        for i in range(0, len(points), BATCH_METRICS):
            client.log_batch(run_id, metrics=points[i:i + BATCH_METRICS])
        if held is not None:
            for m in points:
                held[m.key].add((m.step, m.timestamp))
    elif rec.kind == "params":
        params = [Param(k, str(v)) for k, v in rec.data.items()]
        for i in range(0, len(params), BATCH_PARAMS):
            client.log_batch(run_id, params=params[i:i + BATCH_PARAMS])
    elif rec.kind == "image":
        path = PurePosixPath(rec.data["path"])
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / path.name
            file.write_bytes(base64.b64decode(rec.data["png"]))
            client.log_artifact(run_id, str(file), str(path.parent) if str(path.parent) != "." else None)
    else:
        raise ValueError(f"unknown tracking record kind {rec.kind!r}")


def pending_url(run_storage: str) -> str:
    """Where the workers of the run at `run_storage` (`<checkpoint.storage>/<run name>`) keep
    what the server has not taken."""
    return join(run_storage, PENDING)


class RecordBuffer:
    """A run's records, sent in order by a background thread (`put` only queues: a step never
    waits on the server or on storage); while the server is away they are kept in storage
    (`spill`, a URL) until it takes them, and a record once stored leaves memory (it is read back
    to be sent), so a long outage costs storage, not the worker's memory."""

    def __init__(self, client: MlflowClient, run_id: str, spill: str | None):
        self.client, self.run_id, self.spill = client, run_id, spill
        self.queue: deque[Record] = deque()
        self.cond = threading.Condition()   # held for queue bookkeeping only, never during a send or a write
        self.draining = False       # close() asked: try at once, however long the backoff
        self.stopped = False
        self.failures = 0           # failed sends, all outages together
        self.down_since: float | None = None
        self.refused: Exception | None = None   # a record the server refused: raised by the next put/close
        # Records of a later buffer of the same run (a restarted worker) sort after this one's.
        self.prefix = f"{time.time_ns():020d}-{os.getpid()}"
        self.seq = 0
        self.thread = threading.Thread(target=self._send_all, name="orbitgen-mlflow", daemon=True)
        self.thread.start()

    def put(self, kind: str, data: Any) -> None:
        """Queue a record for the sender thread; returns at once. A record the server refused
        earlier (a caller's bug, not an outage) is raised here, as it would be without a buffer."""
        with self.cond:
            refused, self.refused = self.refused, None
            self.seq += 1
            rec = Record(kind, data, f"{self.prefix}-{self.seq:08d}.json")
            self.queue.append(rec)
            self.cond.notify_all()
            stopped = self.stopped
        if stopped:   # after close(): no thread to send it, keep it for the driver
            self._spill([rec])
        if refused is not None:
            raise refused

    def close(self, timeout: float) -> int:
        """Wait up to `timeout` s for the queue to drain, then stop; returns how many records are
        left (in storage, for the driver's replay)."""
        with self.cond:
            self.draining = True
            self.cond.notify_all()
            self.cond.wait_for(lambda: not self.queue, timeout)
            self.stopped = True
            self.cond.notify_all()
            left = list(self.queue)
            refused, self.refused = self.refused, None
        self._spill(left)
        lost = sum(not r.spilled for r in left)
        if left:
            log.warning("MLflow server still away: %d records left in %s for the driver to deliver%s", len(left),
                        self.spill, f"; {lost} could not be stored and are lost" if lost else "")
        if refused is not None:
            raise refused
        return len(left)

    def in_memory(self) -> int:
        """How many queued records hold their data in memory (not yet stored)."""
        with self.cond:
            return sum(r.data is not None for r in self.queue)

    def _send_all(self) -> None:
        delay = 1.0
        while True:   # until close() stops it
            with self.cond:
                self.cond.wait_for(lambda: self.queue or self.stopped)
                if self.stopped:
                    return
                rec = self.queue[0]
            try:
                data = self._data(rec)
                if data is None:   # its file is gone or damaged: said in _data
                    self._sent(rec)
                    continue
                with quick_failing():
                    deliver(self.client, self.run_id, Record(rec.kind, data, rec.name, rec.spilled, rec.tried))
            except Exception as e:
                if not transient(e):
                    log.warning("MLflow refused a %s record (%s); it is left out", rec.kind, e)
                    with self.cond:
                        self.refused = self.refused or e
                    self._sent(rec)
                    continue
                self._failed(rec, e)
                self._back_off(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)
                continue
            if self.down_since is not None:
                log.warning("MLflow server back after %.0f s (%d failed sends so far): delivering the %d records held",
                            time.monotonic() - self.down_since, self.failures, len(self.queue))
                self.down_since, delay = None, 1.0
            self._sent(rec)

    def _back_off(self, delay: float) -> None:
        """Wait `delay` s before the next try (close() ends the wait at once); records queued
        meanwhile are stored as they come, so they leave memory and outlive this process."""
        deadline = time.monotonic() + delay
        for _ in range(1000):   # bounded: each turn stores at least one record or ends the wait
            with self.cond:
                self.cond.wait_for(lambda: self.stopped or self.draining or self._unstored(),
                                   max(0.0, deadline - time.monotonic()))
                if self.draining:
                    self.draining = False
                    return
                if self.stopped or time.monotonic() >= deadline:
                    return
                todo = [r for r in self.queue if not r.spilled]
            if not self.spill or not self._spill(todo):
                with self.cond:   # storage away: nothing to store until the next try
                    self.cond.wait_for(lambda: self.stopped or self.draining, max(0.0, deadline - time.monotonic()))
                    self.draining = False
                return

    def _unstored(self) -> bool:
        return bool(self.spill) and any(not r.spilled for r in self.queue)

    def _data(self, rec: Record) -> Any:
        """The record's data: in memory, or read back from storage once it was stored there.
        None when its file is gone or damaged (said in the log; the record is lost)."""
        data = rec.data
        if data is not None or not rec.spilled:
            return data
        fs, path = filesystem(self.spill)
        try:
            return Record.from_json(rec.name, fs.cat_file(f"{path}/{rec.name}")).data
        except FileNotFoundError:
            log.warning("tracking record %s/%s is gone from storage; it is left out", self.spill, rec.name)
        except DamagedRecord as e:
            log.warning("%s; it is left out", e)
        return None

    def _failed(self, rec: Record, e: Exception) -> None:
        with self.cond:
            rec.tried = True
            self.failures += 1
            queued = list(self.queue)
            first = self.down_since is None
            if first:
                self.down_since = time.monotonic()
        self._spill(queued)
        if first:
            log.warning("MLflow server not answering (%s): training goes on, records kept in %s and retried",
                        e, self.spill or "memory")

    def _spill(self, records: list[Record]) -> bool:
        """Store the records not stored yet, each file whole or not at all; once stored, a record's
        data leaves memory. False when storage refused (they stay in memory, stored at the next failure)."""
        todo = [r for r in records if not r.spilled]
        if not todo or not self.spill:
            return True
        try:
            fs, path = filesystem(self.spill)
            for r in todo:
                data = r.data
                if data is None:
                    continue
                write_whole(fs, f"{path}/{r.name}", Record(r.kind, data, r.name).to_json())
                r.spilled = True
                r.data = None   # read back from storage when it is sent
            return True
        except Exception as e:
            log.warning("could not keep tracking records in %s (%s); they stay in memory", self.spill, e)
            return False

    def _sent(self, rec: Record) -> None:
        if rec.spilled:   # its file first: once the queue is empty (close), no file of a sent record is left
            try:
                fs, path = filesystem(self.spill)
                fs.rm_file(f"{path}/{rec.name}")
            except Exception as e:   # the replay leaves out what the server holds
                log.warning("could not remove the delivered record %s (%s)", rec.name, e)
        with self.cond:
            if self.queue and self.queue[0] is rec:
                self.queue.popleft()
            self.cond.notify_all()


# The driver's side: what it waits for, and for how long.

# Tracking URI -> (when its server stopped answering, the last failed try), in this process.
_away: dict[str, tuple[float, float]] = {}
IN_A_ROW_S = 2 * MAX_BACKOFF_S   # a failure later than this after the last one starts a new outage


def retried(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)`, tried again with backoff while the tracking server (the current
    tracking URI's) does not answer, until it has been away for the bound (`ORBITGEN_TRACKING_RETRY_S`)
    in all: calls in a row share one bound, so a server that stays away costs it once, not once a
    call (calls in a row: no more than IN_A_ROW_S between failures). A local store cannot go
    away: its errors are raised at once."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return fn(*args, **kwargs)
    delay = 1.0
    while True:
        try:
            with quick_failing():
                out = fn(*args, **kwargs)
            _away.pop(uri, None)
            return out
        except Exception as e:
            if not transient(e):
                raise
            now = time.monotonic()
            since, last = _away.get(uri, (now, now))
            since = since if now - last <= IN_A_ROW_S else now
            _away[uri] = (since, now)
            away = now - since
            left = retry_bound_s() - away
            if left <= 0:
                raise TrackingUnavailable(f"no answer for {away:.0f} s") from e
            time.sleep(min(delay, left))
            delay = min(delay * 2, MAX_BACKOFF_S)


def replay(client: MlflowClient, run_id: str, run_storage: str) -> int:
    """Deliver, oldest first, what the workers of the run left in storage; returns how many records.
    A file that does not read whole (cut short by a crash, from a version that wrote in place) is
    left out and reported, not a failure: it is renamed `*.damaged` so the next replay passes it by."""
    fs, path = filesystem(pending_url(run_storage))
    try:
        names = sorted(fs.ls(path, detail=False))
    except FileNotFoundError:
        return 0
    held: dict[str, set] = {}   # only this replay writes to the run now: read each key's points once
    delivered, damaged = 0, []
    for name in names:
        base = name.rsplit("/", 1)[-1]
        if base.endswith(".partial"):   # a write a crash cut short: its record never was stored
            fs.rm_file(name)
            continue
        if not base.endswith(".json"):   # *.damaged from an earlier replay
            continue
        try:
            rec = Record.from_json(name, retried(fs.cat_file, name))
        except DamagedRecord:
            fs.mv(name, name + ".damaged")
            damaged.append(base)
            continue
        retried(deliver, client, run_id, rec, held)
        fs.rm_file(name)
        delivered += 1
    if damaged:
        log.warning("%d tracking record file(s) in %s did not read whole (cut short by a crash?) and are left out: "
                    "%s; the run lacks what they held; they are kept as *.damaged: delete them once seen",
                    len(damaged), path, ", ".join(damaged[:3]) + (" ..." if len(damaged) > 3 else ""))
    if fs.exists(path) and not fs.ls(path, detail=False):
        fs.rm(path, recursive=True)   # the empty folder, on a local disk
    return delivered


class Unfinished:
    """What the driver's last calls could not do because the server stayed away."""

    def __init__(self) -> None:
        self.what: list[str] = []
        self.why = ""

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        """Run the block; if the server stays away, note `what` and go on (the block is left)."""
        try:
            yield
        except TrackingUnavailable as e:
            self.what.append(what)
            self.why = str(e)

    def __bool__(self) -> bool:
        return bool(self.what)

    def message(self, tracking_uri: str, run_storage: str, checkpoint: str | None, run_name: str) -> str:
        """One line: what was not done, that nothing is lost, and the command that does it later."""
        return (f"tracking  the MLflow server at {tracking_uri} did not answer ({self.why}; bound {RETRY_ENV}="
                f"{retry_bound_s():.0f}): could not {', '.join(self.what)}"
                + ("; the run stays RUNNING there" if END in self.what else "")
                + f". The training is done and kept: checkpoint {checkpoint or run_storage}"
                + (f", records the server missed in {pending_url(run_storage)}" if self.what[0].startswith("deliver")
                   else "")
                + f". When the server is back, `orbitgen train SPEC --resume {run_name}` (same spec) delivers them, "
                f"registers the model and ends the run")


def let_go_of_run() -> None:
    """End the active run in this process without waiting for the server (`mlflow.end_run`
    would retry for minutes); the server keeps it RUNNING until it is ended there."""
    with quick_failing():
        try:
            mlflow.end_run()
        except Exception as e:
            if not transient(e):
                raise
