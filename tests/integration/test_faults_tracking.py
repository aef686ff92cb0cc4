"""The MLflow server goes away during a real training: training goes on, what
it logged meanwhile reaches the server when it is back, the run ends FINISHED and the model is
registered; a server that stays away is waited for within a bound, then the job says what it
could not do and how to do it later, and that advice works.

Each test starts its own `mlflow server` (sqlite backend, so a restart on the same port keeps the
runs) and stops it mid-run; the session's server is shared by other tests and is left alone.
"""
from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from data_shards.storage import filesystem
from jobs.train.driver import JobResult, run_job
from jobs.spec import SPECS_DIR, JobSpec, load_spec
from jobs.tracking import buffered
from local_stack import Service, free_port, start_mlflow

pytestmark = pytest.mark.integration
MODEL = "faults-tracking"
LOG_EVERY = 2


class Server:
    """Our own MLflow server, stopped and started again on the same port and store."""

    def __init__(self, workdir: Path):
        self.workdir, self.port = workdir, free_port()
        self.svc: Service | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.svc = start_mlflow(self.workdir / "mlflow", str(self.workdir / "artifacts"), None, self.port)

    def stop(self) -> None:
        self.svc.stop()
        with pytest.raises(OSError):   # really away: nobody answers on the port
            urllib.request.urlopen(self.url + "/health", timeout=2)


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path / "server")
    yield s
    s.svc.stop()


def _spec(tmp_path: Path, tracking_uri: str, steps: int) -> JobSpec:
    return load_spec(SPECS_DIR / "quickstart.yaml", [
        f"workdir={tmp_path / 'work'}", "data.train=builtin:craters?count=64&seed=0", "data.resolution=16",
        "data.shuffle_buffer=16", "model.ngf=8", "model.ndf=8", "model.nz=8", "train.batch=8",
        f"train.steps={steps}", f"train.log_every={LOG_EVERY}", f"checkpoint.every_steps={steps // 2}",
        "eval.num_samples=16", "scaling.num_workers=1", f"tracking.uri={tracking_uri}",
        f"tracking.registry_model={MODEL}"])


def _in_thread(spec: JobSpec) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def job() -> None:
        try:
            box["result"] = run_job(spec, say=print)
        except BaseException as e:   # re-raised by the test
            box["error"] = e
        box["returned"] = time.monotonic()

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    return thread, box


def _result(thread: threading.Thread, box: dict, timeout: float) -> JobResult:
    thread.join(timeout)
    assert not thread.is_alive(), f"run_job still running after {timeout} s"
    if "error" in box:
        raise box["error"]
    return box["result"]


def _first_metrics(client: MlflowClient, experiment: str, thread: threading.Thread) -> str:
    """The run id, once the server holds its first training metrics."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and thread.is_alive():
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if runs and client.get_metric_history(runs[0].info.run_id, "loss_D"):
            return runs[0].info.run_id
        time.sleep(0.3)
    pytest.fail("no training metrics reached the server")


def _pending(result: JobResult) -> list[str]:
    fs, path = filesystem(buffered.pending_url(result.storage))
    return fs.ls(path, detail=False) if fs.exists(path) else []


def test_server_away_mid_run_loses_nothing(server, ray_local, tmp_path, monkeypatch):
    monkeypatch.setenv(buffered.RETRY_ENV, "120")
    steps = 300
    spec = _spec(tmp_path, server.url, steps)
    thread, box = _in_thread(spec)
    client = MlflowClient(server.url)
    run_id = _first_metrics(client, spec.experiment, thread)

    stopping = time.time()
    server.stop()
    down = time.time()   # from here on nobody answers
    server.start()       # takes seconds
    up = time.time()
    print(f"MLflow server away for {up - stopping:.1f} s")
    # Usually the worker delivers what it kept while it still trains; else the driver does, after.
    while thread.is_alive() and not any(down * 1000 < m.timestamp < up * 1000
                                        for m in client.get_metric_history(run_id, "loss_D")):
        time.sleep(0.5)
    print("what the server missed reached it", "while training went on" if thread.is_alive() else "after training")
    result = _result(thread, box, timeout=300)

    assert result.run_id == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run_id, "loss_D")
    # Every logged step once: none lost in the outage, none sent twice.
    assert [m.step for m in history] == list(range(LOG_EVERY, steps + 1, LOG_EVERY))
    # Training went on while the server was away: points were measured then, delivered later.
    during = [m for m in history if down * 1000 < m.timestamp < up * 1000]
    assert during, "the outage did not fall within the training"
    print(f"{len(during)} of {len(history)} loss_D points were logged while the server was away")
    assert "fid" in run.data.metrics and "orbitgen.checkpoint" in run.data.tags
    assert result.model_version == "1" and "tracking_unfinished" not in result.extra
    assert client.get_model_version(MODEL, "1").run_id == run_id
    assert _pending(result) == []


def test_server_away_through_registration_says_what_to_do(server, ray_local, tmp_path, monkeypatch):
    bound = 5
    monkeypatch.setenv(buffered.RETRY_ENV, str(bound))
    steps = 40
    spec = _spec(tmp_path, server.url, steps)
    thread, box = _in_thread(spec)
    client = MlflowClient(server.url)
    run_id = _first_metrics(client, spec.experiment, thread)

    server.stop()
    down = time.monotonic()
    result = _result(thread, box, timeout=300)
    waited = box["returned"] - down
    print(f"run_job returned {waited:.1f} s after the server went away (bound {bound} s)")
    # The rest of the training, the workers' last wait (10 s) and the bound, not MLflow's own
    # retries (minutes a call) nor the default bound.
    assert waited < 60

    msg = result.extra["tracking_unfinished"]
    assert "\n" not in msg
    for part in ("register the model", "end the run", "stays RUNNING", result.checkpoint,
                 f"orbitgen train SPEC --resume {result.run_name}"):
        assert part in msg
    assert result.model_version is None
    fs, path = filesystem(result.checkpoint)
    assert any(p.endswith("generator.pt") for p in fs.find(path)), "the checkpoint is gone"
    assert _pending(result), "the records the server missed are not in the run's storage"

    # When the server is back: the run is still RUNNING (nobody could end it); the advice works.
    server.start()
    assert client.get_run(run_id).info.status == "RUNNING"
    resumed = run_job(spec, say=print, resume=result.run_name)
    assert resumed.run_id == run_id and resumed.model_version == "1"
    assert client.get_run(run_id).info.status == "FINISHED"
    history = client.get_metric_history(run_id, "loss_D")
    assert [m.step for m in history] == list(range(LOG_EVERY, steps + 1, LOG_EVERY))
    assert _pending(resumed) == []
