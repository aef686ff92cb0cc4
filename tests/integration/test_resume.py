"""Resume on real parts (local Ray, 2 CPU workers, sqlite MLflow): a DeepSpeed ZeRO-1 run stopped
after checkpoint k (a worker SIGKILLed, no restarts allowed) and continued with
`orbitgen train SPEC --resume RUN` continues the same Ray run and MLflow run and ends with the
weights and image counter of an uninterrupted run with the same seed.

The helpers here are shared with tests/test_fault_tolerance.py (same tiny run, same references),
so that each uninterrupted reference run is trained once per session.
"""
from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import mlflow
import pytest
import ray
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from ray.util.state import list_actors

from jobs.train import checkpoints
from jobs.cli import main
from jobs.train.resume import RUN_INFO
from jobs.train.driver import JobResult, make_trainer, run_job
from jobs.spec import SPECS_DIR, JobSpec, load_spec

REPO = Path(__file__).resolve().parents[2]
# DeepSpeed JIT-compiles a comm op once per machine (~25 s); keep it in the repo's ignored cache.
# Set at import, before the session's Ray starts: local Ray workers inherit the driver's environment.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
# Ray Train registers reported checkpoints (and notices dead workers) when it polls the workers,
# every 2 s by default: poll often, so that a checkpoint is registered long before the next one.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

STEPS, EVERY, BATCH = 40, 10, 8
STRATEGIES = {"ddp": ["strategy.kind=ddp"],
              "zero1": ["strategy.kind=deepspeed", "strategy.zero_stage=1"],
              "zero2": ["strategy.kind=deepspeed", "strategy.zero_stage=2"]}
Weights = dict[str, dict[str, torch.Tensor]]


def tiny_overrides(workdir: Path, strategy: str, *extra: str) -> list[str]:
    """The smallest real run: dcgan 16², widths 8, 64 built-in crater images, batch 8 on 2 workers."""
    return [f"workdir={workdir}", "data.train=builtin:craters?count=64&seed=0", "data.resolution=16",
            "data.shuffle_buffer=16", "data.loader_workers=0", "model.nz=16", "model.ngf=8", "model.ndf=8",
            f"train.batch={BATCH}", f"train.steps={STEPS}", "train.log_every=1", f"checkpoint.every_steps={EVERY}",
            "checkpoint.keep=2", "eval.num_samples=32", "tracking.registry_model=null",
            # Explicit: mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI, which the next spec would inherit.
            f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
            *STRATEGIES[strategy], *extra]


def tiny_spec(workdir: Path, strategy: str, *extra: str) -> JobSpec:
    return load_spec(SPECS_DIR / "quickstart.yaml", tiny_overrides(workdir, strategy, *extra))


def checkpoint_weights(checkpoint: str | Path) -> Weights:
    """G and D weights of a checkpoint, read from the files the engines wrote (DDP or DeepSpeed)."""
    d = Path(checkpoint)
    engines = d / checkpoints.ENGINES
    d_file = engines / "D.pt" if (engines / "D.pt").exists() else engines / "D" / "mp_rank_00_model_states.pt"
    return {"G": torch.load(d / checkpoints.SNAPSHOT, weights_only=True)["state_dict"],
            "D": torch.load(d_file, weights_only=False)["module"]}


def assert_same_weights(a: Weights, b: Weights) -> None:
    for net in ("G", "D"):
        assert a[net].keys() == b[net].keys()
        for k in a[net]:
            torch.testing.assert_close(a[net][k].float(), b[net][k].float(), rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{net}.{k}: {m}")


_references: dict[str, tuple[Weights, int]] = {}


def reference(strategy: str, workdir: Path) -> tuple[Weights, int]:
    """(final weights, images seen) of the uninterrupted run; trained once per session and strategy."""
    if strategy not in _references:
        res = run_job(tiny_spec(workdir, strategy), say=print)
        _references[strategy] = checkpoint_weights(res.checkpoint), res.metrics["images_seen"]
    return _references[strategy]


class WorkerKiller(threading.Thread):
    """SIGKILLs one Ray Train worker process of the run under `runs` as soon as Ray has registered
    the run's first checkpoint (a checkpoint reported but not yet registered is not one to resume from)."""

    def __init__(self, runs: Path, timeout: float = 240):
        super().__init__(daemon=True)
        self.runs, self.timeout = runs, timeout
        self.address = ray.get_runtime_context().gcs_address   # this session's Ray, not another one here
        self.killed_pid: int | None = None
        self.killed_at = 0.0
        self.error: str | None = None

    def _worker_pids(self) -> list[int]:
        return [a.pid for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                                           address=self.address, detail=True, raise_on_missing_output=False)]

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        pids: list[int] = []
        while time.monotonic() < deadline:
            if len(pids) < 2:   # look the pids up early: at the checkpoint there is no time to lose
                pids = self._worker_pids()
            elif any(self.runs.glob("*/checkpoint_manager_snapshot.json")):   # Ray writes it on registering
                os.kill(pids[-1], signal.SIGKILL)
                self.killed_pid, self.killed_at = pids[-1], time.time()
                return
            time.sleep(0.02)
        self.error = f"no registered checkpoint under {self.runs} within {self.timeout} s"


def run_killed(spec: JobSpec) -> tuple[WorkerKiller, JobResult | Exception]:
    """Runs `spec` while a WorkerKiller watches its storage; the result, or the error the run ended with."""
    killer = WorkerKiller(Path(spec.storage_url().removeprefix("file://")))
    killer.start()
    try:
        outcome: JobResult | Exception = run_job(spec, say=print)
    except Exception as e:   # noqa: BLE001  (max_failures exhausted: the run stops with an error)
        outcome = e
    killer.join()
    assert killer.error is None and killer.killed_pid is not None, killer.error
    return killer, outcome


def assert_resumed_once_losing_at_most_one_interval(tracking_uri: str, run_id: str, killer: WorkerKiller) -> None:
    """The run resumed once, from a checkpoint, and lost at most one checkpoint interval: the steps
    rank 0 had logged before the kill, minus the step it resumed from."""
    client = MlflowClient(tracking_uri)
    resumed = [int(m.value) for m in client.get_metric_history(run_id, "resumed_from_step")]
    assert len(resumed) == 1 and resumed[0] > 0 and resumed[0] % EVERY == 0, resumed
    before_kill = [m.step for m in client.get_metric_history(run_id, "loss_D") if m.timestamp <= killer.killed_at * 1000]
    assert before_kill and resumed[0] <= max(before_kill) < STEPS, f"the kill did not land mid-run: {before_kill}"
    assert max(before_kill) - resumed[0] <= EVERY


@pytest.mark.integration
def test_crashed_run_continues_with_resume_exactly(ray_local, tmp_path_factory):
    # ZeRO-1 here; DDP and ZeRO-2 resume after a kill in tests/test_fault_tolerance.py.
    workdir = tmp_path_factory.mktemp("resume")
    weights, images = reference("zero1", workdir)
    storage = workdir / "crashed"
    # A worker killed after checkpoint 1 with no restarts allowed: the run stops with an error.
    killer, outcome = run_killed(tiny_spec(workdir, "zero1", "checkpoint.max_failures=0", f"checkpoint.storage={storage}"))
    assert isinstance(outcome, Exception), "the run survived a kill without restarts"
    [info_file] = storage.glob(f"*/{RUN_INFO}")
    run_name, run_id = info_file.parent.name, json.loads(info_file.read_text())["mlflow_run_id"]

    spec_file = workdir / "spec.yaml"
    spec_file.write_text((SPECS_DIR / "quickstart.yaml").read_text())
    args = ["train", str(spec_file), "--resume", run_name]
    for o in tiny_overrides(workdir, "zero1", f"checkpoint.storage={storage}"):
        args += ["--set", o]
    # The resuming process worked in another experiment before (a notebook, an earlier job): MLflow
    # refuses to reopen a run outside the active experiment unless the runner switches to the run's.
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    mlflow.set_experiment("elsewhere")
    out = CliRunner().invoke(main, args, catch_exceptions=False)
    assert out.exit_code == 0, out.output

    # The same Ray run and MLflow run, continued from its last checkpoint to the end.
    assert f"run {run_name}" in out.output and f"mlflow run   {run_id}" in out.output
    assert_resumed_once_losing_at_most_one_interval(f"sqlite:///{workdir / 'mlflow.db'}", run_id, killer)
    last = Path(re.search(r"checkpoints  (\S+)", out.output).group(1))
    assert checkpoints.progress(last)["step"] == STEPS
    assert checkpoints.progress(last)["images_seen"] == images == STEPS * BATCH
    assert_same_weights(checkpoint_weights(last), weights)


def latest_checkpoint(run_dir: Path) -> Path:
    """The kept checkpoint with the highest step (with best-by-metric retention, not the one the run returns)."""
    return max((p.parent for p in run_dir.glob("checkpoint_*/progress.json")),
               key=lambda d: checkpoints.progress(d)["step"])


def test_trainer_takes_failures_timeout_and_retention_from_the_spec():
    spec = tiny_spec(Path("/tmp/unused"), "ddp", "checkpoint.max_failures=2", "checkpoint.keep=4",
                     "checkpoint.best_metric=fid", "checkpoint.best_mode=min", "strategy.timeout_s=77")
    trainer = make_trainer(spec, "run-x", "/tmp/unused/runs", {})
    run = trainer.run_config
    assert (run.name, run.storage_path) == ("run-x", "/tmp/unused/runs")   # same name and storage: Ray resumes
    assert run.failure_config.max_failures == 2
    assert (run.checkpoint_config.num_to_keep, run.checkpoint_config.checkpoint_score_attribute,
            run.checkpoint_config.checkpoint_score_order) == (4, "fid", "min")
    assert (trainer.backend_config.backend, trainer.backend_config.timeout_s) == ("gloo", 77)


def test_resume_of_an_unknown_run_names_the_runs_there(tmp_path):
    runs = tmp_path / "runs"
    (runs / "quickstart-0123abcd").mkdir(parents=True)
    (runs / "quickstart-0123abcd" / RUN_INFO).write_text("{}")
    args = ["quickstart", "--workdir", str(tmp_path), "--resume", "quickstart-ffffffff",
            "--set", "data.train=builtin:craters?count=8&seed=0", "--set", "data.resolution=8"]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 2
    assert "no orbitgen run 'quickstart-ffffffff'" in out.output and "quickstart-0123abcd" in out.output
