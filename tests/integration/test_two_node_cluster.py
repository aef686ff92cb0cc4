"""Beyond one machine: a two-node Ray cluster on loopback (a head and a worker node, each with its
own temp dir, ports and a resource naming it), data, checkpoints and MLflow artifacts on the S3
server only. A job submitted with `orbitgen jobs submit` puts one training worker on each node
(`scaling.placement_strategy=STRICT_SPREAD`); the worker node is stopped mid-run and started
again, and the run continues from its last checkpoint on both nodes and completes.

Nothing may rely on the driver's disk: the job's driver runs on the head, the worker node has
its own temp dir, so any file the driver wrote and a worker read would be missing there.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import boto3
import pytest
from mlflow.tracking import MlflowClient
from ray.util.state import list_actors

from data_shards.builtin import ensure_builtin
from ray_nodes import BIN, start_head, start_worker

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
STEPS, EVERY, BATCH = 60, 20, 8
DOWN_S = 5   # how long the worker node stays stopped


def _train_workers(dashboard: str, alive_only: bool = False) -> list:
    """Ray Train's worker actors of the cluster (what `ray list actors` shows), with their nodes."""
    filters = [("class_name", "=", "RayTrainWorker"), *([("state", "=", "ALIVE")] if alive_only else [])]
    return list_actors(address=dashboard, filters=filters, detail=True, raise_on_missing_output=False)


def _keys(s3, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="orbitgen", Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _checkpoint_steps(s3, prefix: str) -> list[int]:
    """The steps of the checkpoints written under `prefix` so far."""
    return sorted(json.loads(s3.get_object(Bucket="orbitgen", Key=key)["Body"].read())["step"]
                  for key in _keys(s3, prefix) if key.endswith("/progress.json"))


def test_job_spans_two_nodes_and_survives_the_worker_node_stopping(s3_server, mlflow_server):
    root = f"two-node-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3", endpoint_url=s3_server.url)
    shards = ensure_builtin("builtin:craters?count=64&seed=0", f"s3://orbitgen/{root}/shards", 16, 1)
    sets = [f"name={root}", f"data.train={shards}", "data.resolution=16", "data.shuffle_buffer=16",
            "data.loader_workers=0", "model.nz=16", "model.ngf=8", "model.ndf=8", f"train.batch={BATCH}",
            f"train.steps={STEPS}", "train.log_every=1", f"checkpoint.every_steps={EVERY}", "checkpoint.keep=2",
            "checkpoint.max_failures=1", f"checkpoint.storage=s3://orbitgen/{root}/runs", "eval.num_samples=32",
            "tracking.registry_model=null", "scaling.num_workers=2", "scaling.placement_strategy=STRICT_SPREAD"]

    base = Path(tempfile.mkdtemp(prefix="og2n-", dir="/tmp"))   # short: Ray's socket paths must fit
    # Ray Train registers reported checkpoints when it polls the workers (every 2 s by default):
    # poll often, so that the node stops long after checkpoint k is registered and before k+1 is reported.
    head = start_head(base / "head", 2, {"node_head": 1}, env={"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"})
    nodes = [head]
    try:
        worker, worker_id = start_worker(head, base / "worker", 2, {"node_worker": 1})
        nodes.append(worker)
        env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.url}   # travels with the job, as AWS_* do
        sub = subprocess.run([str(BIN / "orbitgen"), "jobs", "submit", "jobs/specs/quickstart.yaml", "--address",
                              head.dashboard, *[a for s in sets for a in ("--set", s)]],
                             capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
        assert sub.returncode == 0, sub.stderr
        job_id = sub.stdout.strip().splitlines()[-1]

        # Both workers up, one a node; then the first registered checkpoint: stop the worker node.
        deadline, spread = time.monotonic() + 180, set()
        while not (len(spread) == 2 and any(k.endswith("/checkpoint_manager_snapshot.json")
                                            for k in _keys(s3, f"{root}/runs/"))):
            assert time.monotonic() < deadline, "no registered checkpoint with workers on both nodes in 180 s"
            if len(spread) < 2:
                spread = {a.node_id for a in _train_workers(head.dashboard, alive_only=True)}
            time.sleep(0.05)
        assert worker_id in spread
        head_id = (spread - {worker_id}).pop()
        stopped_at = time.time()
        worker.stop()
        down = time.monotonic()
        written = _checkpoint_steps(s3, f"{root}/runs/")   # what a restart could resume from
        time.sleep(DOWN_S)
        worker, again_id = start_worker(head, base / "worker-again", 2, {"node_worker": 1})
        nodes.append(worker)
        down_s = time.monotonic() - down

        deadline, status = time.monotonic() + 240, ""
        while status not in ("SUCCEEDED", "FAILED", "STOPPED") and time.monotonic() < deadline:
            time.sleep(2)
            status = subprocess.run([str(BIN / "orbitgen"), "jobs", "status", job_id, "--address", head.dashboard],
                                    capture_output=True, text=True, timeout=60).stdout.strip()
        logs = subprocess.run([str(BIN / "orbitgen"), "jobs", "logs", job_id, "--address", head.dashboard],
                              capture_output=True, text=True, timeout=60).stdout
        assert status == "SUCCEEDED", logs[-4000:]

        # Workers ran on both nodes before the stop and after it (the worker node came back as a new node).
        workers = _train_workers(head.dashboard)
        assert {a.node_id for a in workers} == {head_id, worker_id, again_id}, workers
        assert len(workers) == 4   # one worker group restart, two workers each

        # The run continued from its last checkpoint: one resume, at most one interval lost.
        run_id = re.search(r"mlflow .* run ([0-9a-f]{32})", logs).group(1)
        client = MlflowClient(mlflow_server.url)
        assert client.get_run(run_id).info.status == "FINISHED"
        resumed = [int(m.value) for m in client.get_metric_history(run_id, "resumed_from_step")]
        assert resumed == [written[-1]], f"resumed from {resumed}, checkpoints at the stop: {written}"
        before = [m.step for m in client.get_metric_history(run_id, "loss_D") if m.timestamp <= stopped_at * 1000]
        assert before and resumed[0] <= max(before) < STEPS, f"the stop did not land mid-run: {before}"
        lost = max(before) - resumed[0]
        assert lost <= EVERY
        assert f"[orbitgen] resumed from step {resumed[0]}" in logs   # the driver's console shows it
        assert re.search(rf"\b{STEPS}/{STEPS} \[", logs)                 # and its progress bar the end

        # Complete: the final checkpoint (on S3) counts every step of both ranks.
        checkpoint = client.get_run(run_id).data.tags["orbitgen.checkpoint"]
        assert checkpoint.startswith(f"orbitgen/{root}/runs/") or checkpoint.startswith(f"s3://orbitgen/{root}/runs/")
        key = checkpoint.removeprefix("s3://").removeprefix("orbitgen/") + "/progress.json"
        progress = json.loads(s3.get_object(Bucket="orbitgen", Key=key)["Body"].read())
        assert progress["steps_per_rank"] == [STEPS, STEPS] and progress["images_seen"] == STEPS * BATCH

        # Nothing on the driver's disk: the job's working dir on the head got no work dir but its log file.
        work_dirs = list(head.temp_dir.glob("session_*/runtime_resources/working_dir_files/*/orbitgen-work"))
        on_driver = sorted({str(p.relative_to(w)) for w in work_dirs for p in w.rglob("*")})
        assert all(p == "logs" or p.startswith("logs/") for p in on_driver), on_driver
        print(f"\nworker node down {down_s:.1f} s; resumed from step {resumed[0]}, {lost} steps lost; "
              f"on the driver's disk: {on_driver}")
    finally:
        for node in reversed(nodes):
            node.stop(grace_s=5)
        shutil.rmtree(base, ignore_errors=True)
