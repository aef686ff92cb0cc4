"""Nodes that share no disk: a two-node Ray cluster on loopback whose worker node runs in its own
mount namespace, with empty private tmpfs over the driver's work folder, its Ray temp dir and the
test session's folders, as a second machine sees them (nothing). `orbitgen train` drives it from this machine (RAY_ADDRESS).

- A spec whose files are on this machine's disk is refused in one line, exit 2, before anything
  starts (no MLflow run, no built-in data made).
- With ORBITGEN_STORAGE on the S3 server and an MLflow server, the same spec trains with a worker
  on each node: the built-in set is written to S3 once and read from there, checkpoints go to S3,
  and the model is registered.
- A GPU spec on this GPU-less cluster (which cannot grow) is refused in one line.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import boto3
import pytest
from mlflow.tracking import MlflowClient
from ray.util.state import list_actors

from ray_nodes import BIN, start_head, start_worker

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
TINY = ["data.train=builtin:craters?count=64&seed=0", "data.resolution=16", "data.shuffle_buffer=16",
        "data.loader_workers=0", "model.nz=16", "model.ngf=8", "model.ndf=8", "train.batch=8", "train.steps=20",
        "checkpoint.every_steps=10", "eval.num_samples=32", "scaling.num_workers=2",
        "scaling.placement_strategy=STRICT_SPREAD"]


def driver_folders(*candidates: Path) -> list[Path]:
    """The driver's folders a second machine would not have; never one holding the code or the
    venv, which a real node has of its own (its image)."""
    keep = [REPO, Path(sys.prefix).resolve()]
    return [d for d in candidates if d.exists() and not any(k.is_relative_to(d.resolve()) for k in keep)]


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    """(head, worker node id, the driver's work folder the worker node cannot see)."""
    base = Path(tempfile.mkdtemp(prefix="ogsd-", dir="/tmp"))   # short: Ray's socket paths must fit
    work = base / "driver-work"
    work.mkdir()
    # The worker node's own temp dir lies outside what it cannot see.
    own = Path(tempfile.mkdtemp(prefix="ogsd-w-", dir="/var/tmp"))
    head = start_head(base / "head", 2, {"node_head": 1})
    nodes = [head]
    # The driver's work folder and Ray temp dir (both under `base`), and the test session's folders.
    hidden = driver_folders(base, tmp_path_factory.getbasetemp())
    try:
        worker, worker_id = start_worker(head, own / "node", 2, {"node_worker": 1}, hidden=hidden)
        nodes.append(worker)
        yield head, worker_id, work
    finally:
        for node in reversed(nodes):
            node.stop(grace_s=5)
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(own, ignore_errors=True)


def train(head, work: Path, *sets: str, env: dict[str, str] | None = None,
          timeout_s: float = 600) -> subprocess.CompletedProcess:
    args = [str(BIN / "orbitgen"), "train", "jobs/specs/quickstart.yaml", "--set", f"workdir={work}",
            *[a for s in [*TINY, *sets] for a in ("--set", s)]]
    full = {**os.environ, "RAY_ADDRESS": head.gcs_address, **(env or {})}
    for key in ("ORBITGEN_STORAGE", "MLFLOW_TRACKING_URI"):
        if key not in (env or {}):
            full.pop(key, None)
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, env=full, cwd=REPO)
    except subprocess.TimeoutExpired as e:   # what it was doing, rather than only that it took too long
        pytest.fail(f"orbitgen train still running after {timeout_s} s:\n{(e.stderr or b'')[-3000:]!r}")


def error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def test_local_paths_are_refused_in_one_line_before_anything_starts(cluster):
    head, _, work = cluster
    proc = train(head, work)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = error_line(proc)
    # The first of the spec's local places: the built-in set would be made under the workdir.
    assert line.startswith("error: data.train: ") and str(work / "shards") in line and "2 nodes" in line
    assert "storage.root" in line and "ORBITGEN_STORAGE" in line and "storage.shared_mounts" in line
    assert not (work / "shards").exists() and not (work / "mlflow.db").exists()


def test_a_gpu_spec_on_a_gpu_less_cluster_is_refused_in_one_line(cluster, s3_server, mlflow_server):
    head, _, work = cluster
    proc = train(head, work, "scaling.use_gpu=true", timeout_s=120,
                 env={"ORBITGEN_STORAGE": "s3://orbitgen/never", "MLFLOW_TRACKING_URI": mlflow_server.url})
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = error_line(proc)
    assert "2 training workers × {GPU: 1, CPU: 1} never fit on 2 nodes: {CPU: 4}" in line
    assert "--set scaling.use_gpu=false" in line


def test_object_storage_trains_across_both_nodes_from_a_builtin_set(cluster, s3_server, mlflow_server):
    head, worker_id, work = cluster
    root = f"separate-{uuid.uuid4().hex[:8]}"
    proc = train(head, work, f"name={root}", f"tracking.registry_model={root}-dcgan",
                 env={"ORBITGEN_STORAGE": f"s3://orbitgen/{root}", "MLFLOW_TRACKING_URI": mlflow_server.url})
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout + proc.stderr
    assert f"s3://orbitgen/{root}/shards/craters-n64" in out and f"checkpoints under s3://orbitgen/{root}/runs" in out

    s3 = boto3.client("s3", endpoint_url=s3_server.url)
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="orbitgen", Prefix=root)
            for o in page.get("Contents", [])]
    assert any(k.startswith(f"{root}/shards/") and k.endswith("manifest.parquet") for k in keys)
    assert any(k.startswith(f"{root}/runs/") and k.endswith("generator.pt") for k in keys)
    assert not (work / "shards").exists()   # written to S3 once, nothing on the driver's disk

    workers = list_actors(address=head.dashboard, filters=[("class_name", "=", "RayTrainWorker")], detail=True,
                          raise_on_missing_output=False)
    assert worker_id in {a.node_id for a in workers}   # a worker ran where the driver's disk is not
    versions = MlflowClient(mlflow_server.url).search_model_versions(f"name='{root}-dcgan'")
    assert [v.version for v in versions] == ["1"]
