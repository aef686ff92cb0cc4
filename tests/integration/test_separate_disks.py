"""Nodes that share no disk: a two-node Ray cluster on loopback whose worker node runs in its own
mount namespace, with empty private tmpfs over the driver's work folder, its Ray temp dir and the
test session's folders, as a second machine sees them (nothing). The commands drive it from this
machine (RAY_ADDRESS), as a user's laptop or the head's shell would.

- A spec whose files are on this machine's disk is refused in one line, exit 2, before anything
  starts (no MLflow run, no built-in data made).
- A GPU spec on this GPU-less cluster (which cannot grow) is refused in one line.
- With ORBITGEN_STORAGE on the S3 server and an MLflow server, the same spec trains with a worker
  on each node: the built-in set is written to S3 once and read from there, checkpoints go to S3,
  and the model is registered. The driver's own credentials (which differ from the nodes') and the
  password in its tracking URI appear nowhere: not on S3, not in MLflow, not in Ray's view of the
  training, not on the console.
- `orbitgen eval` and `models generate` run their workers on both nodes against that model.
- A training whose worker node is stopped after a checkpoint finishes, on the node that replaces
  it, from that checkpoint.
- `orbitgen search mineaug` runs stage 1 and a short stage 2 with trials on both nodes.
- A training, a search and an evaluation whose nodes are busy say what they wait for, then run.
- An MLflow experiment whose artifacts go to a folder (each node's own disk) is refused in one
  line, and doctor says so too.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import boto3
import pytest
from mlflow.tracking import MlflowClient
from ray.util.state import list_actors

from ray_nodes import BIN, RayNode, start_head, start_worker
from secret_scan import leaks, mlflow_texts

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
TINY = ["data.train=builtin:craters?count=64&seed=0", "data.resolution=16", "data.shuffle_buffer=16",
        "data.loader_workers=0", "model.nz=16", "model.ngf=8", "model.ndf=8", "train.batch=8", "train.steps=20",
        "checkpoint.every_steps=10", "eval.num_samples=32", "scaling.num_workers=2",
        "scaling.placement_strategy=STRICT_SPREAD"]
# The driver's credentials: distinct from the nodes' own (the S3 fixture's), which the S3 server also takes.
DRIVER_SECRETS = {"AWS_ACCESS_KEY_ID": "AKIAORBITGENDRIVER7Q2", "AWS_SECRET_ACCESS_KEY": "driver-secret-never-shown-8d3a"}
URI_PASSWORD = "driver-uri-password-c41e"


def driver_folders(*candidates: Path) -> list[Path]:
    """The driver's folders a second machine would not have; never one holding the code or the
    venv, which a real node has of its own (its image)."""
    keep = [REPO, Path(sys.prefix).resolve()]
    return [d for d in candidates if d.exists() and not any(k.is_relative_to(d.resolve()) for k in keep)]


@dataclass
class TwoNodes:
    head: RayNode
    worker: RayNode
    worker_id: str
    work: Path          # the driver's work folder, which the worker node cannot see
    own: Path           # the worker node's own temp folder
    hidden: list[Path]
    restarts: int = 0

    def replace_worker(self) -> None:
        """Stop the worker node (as a machine that goes away) and join a fresh one in its place."""
        self.worker.stop(grace_s=2)
        self.restarts += 1
        self.worker, self.worker_id = start_worker(self.head, self.own / f"node{self.restarts}", 2,
                                                   {"node_worker": 1}, hidden=self.hidden)


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    base = Path(tempfile.mkdtemp(prefix="ogsd-", dir="/tmp"))   # short: Ray's socket paths must fit
    work = base / "driver-work"
    work.mkdir()
    # The worker node's own temp dir lies outside what it cannot see.
    own = Path(tempfile.mkdtemp(prefix="ogsd-w-", dir="/var/tmp"))
    head = start_head(base / "head", 2, {"node_head": 1})
    nodes = TwoNodes(head, head, "", work, own, driver_folders(base, tmp_path_factory.getbasetemp()))
    try:
        nodes.worker, nodes.worker_id = start_worker(head, own / "node0", 2, {"node_worker": 1}, hidden=nodes.hidden)
        yield nodes
    finally:
        for node in {id(n): n for n in (nodes.worker, head)}.values():
            node.stop(grace_s=5)
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(own, ignore_errors=True)


def command_env(nodes: TwoNodes, **extra: str) -> dict[str, str]:
    """This machine's environment for a command against the cluster: no storage or tracking set
    unless given, the driver's own credentials."""
    env = {**os.environ, "RAY_ADDRESS": nodes.head.gcs_address, **DRIVER_SECRETS, **extra}
    for key in ("ORBITGEN_STORAGE", "MLFLOW_TRACKING_URI"):
        if key not in extra:
            env.pop(key, None)
    return env


def orbitgen(nodes: TwoNodes, *args: str, env: dict[str, str] | None = None,
             timeout_s: float = 600) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([str(BIN / "orbitgen"), *args], capture_output=True, text=True, timeout=timeout_s,
                              env=env or command_env(nodes), cwd=REPO)
    except subprocess.TimeoutExpired as e:   # what it was doing, rather than only that it took too long
        pytest.fail(f"orbitgen {args[0]} still running after {timeout_s} s:\n{(e.stderr or b'')[-3000:]!r}")


def train_args(nodes: TwoNodes, *sets: str) -> list[str]:
    return ["train", "jobs/specs/quickstart.yaml", "--set", f"workdir={nodes.work}",
            *[a for s in [*TINY, *sets] for a in ("--set", s)]]


def error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def s3_keys(s3_server, prefix: str) -> list[str]:
    s3 = boto3.client("s3", endpoint_url=s3_server.url)
    return [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="orbitgen", Prefix=prefix)
            for o in page.get("Contents", [])]


def run_id(proc: subprocess.CompletedProcess) -> str:
    """The MLflow run a command printed (`mlflow … · run <id>`)."""
    return re.search(r"mlflow .* · run ([0-9a-f]{32})", proc.stdout + proc.stderr).group(1)


def secret_uri(mlflow_server) -> str:
    return f"http://trainer:{URI_PASSWORD}@{urlsplit(mlflow_server.url).netloc}"


def test_local_paths_are_refused_in_one_line_before_anything_starts(cluster):
    proc = orbitgen(cluster, *train_args(cluster))
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = error_line(proc)
    work = cluster.work
    # The first of the spec's local places: the built-in set would be made under the workdir.
    assert line.startswith("error: data.train: ") and str(work / "shards") in line and "2 nodes" in line
    assert "storage.root" in line and "ORBITGEN_STORAGE" in line and "storage.shared_mounts" in line
    assert not (work / "shards").exists() and not (work / "mlflow.db").exists()


def test_a_gpu_spec_on_a_gpu_less_cluster_is_refused_in_one_line(cluster, s3_server, mlflow_server):
    env = command_env(cluster, ORBITGEN_STORAGE="s3://orbitgen/never", MLFLOW_TRACKING_URI=mlflow_server.url)
    proc = orbitgen(cluster, *train_args(cluster, "scaling.use_gpu=true"), env=env, timeout_s=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = error_line(proc)
    assert "2 training workers × {GPU: 1, CPU: 1} never fit on 2 nodes: {CPU: 4}" in line
    assert "--set scaling.use_gpu=false" in line


@dataclass
class Trained:
    root: str
    model: str
    env: dict[str, str]
    proc: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def trained(cluster, s3_server, mlflow_server) -> Trained:
    """One training on object storage from a built-in set, the tracking URI carrying a password."""
    root = f"separate-{uuid.uuid4().hex[:8]}"
    # Ray's Train state on, as a cluster whose dashboard shows the Train tab has it.
    env = command_env(cluster, ORBITGEN_STORAGE=f"s3://orbitgen/{root}", MLFLOW_TRACKING_URI=secret_uri(mlflow_server),
                      RAY_TRAIN_ENABLE_STATE_TRACKING="1")
    proc = orbitgen(cluster, *train_args(cluster, f"name={root}", f"tracking.registry_model={root}-dcgan"), env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return Trained(root, f"{root}-dcgan", env, proc)


def test_object_storage_trains_across_both_nodes_from_a_builtin_set(cluster, trained, s3_server, mlflow_server):
    root, out = trained.root, trained.proc.stdout + trained.proc.stderr
    assert f"s3://orbitgen/{root}/shards/craters-n64" in out and f"checkpoints under s3://orbitgen/{root}/runs" in out
    keys = s3_keys(s3_server, root)
    assert any(k.startswith(f"{root}/shards/") and k.endswith("manifest.parquet") for k in keys)
    assert any(k.startswith(f"{root}/runs/") and k.endswith("generator.pt") for k in keys)
    assert not (cluster.work / "shards").exists()   # written to S3 once, nothing on the driver's disk

    workers = list_actors(address=cluster.head.dashboard, filters=[("class_name", "=", "RayTrainWorker")],
                          detail=True, raise_on_missing_output=False)
    assert cluster.worker_id in {a.node_id for a in workers}   # a worker ran where the driver's disk is not
    versions = MlflowClient(mlflow_server.url).search_model_versions(f"name='{trained.model}'")
    assert [v.version for v in versions] == ["1"]


def test_no_credential_of_the_driver_is_written_or_shown(cluster, trained, s3_server, mlflow_server, tmp_path):
    secrets = {**DRIVER_SECRETS, "the tracking URI's password": URI_PASSWORD}
    records: dict[str, bytes | str] = {"console": trained.proc.stdout + trained.proc.stderr}
    assert "trainer:***@" in records["console"]   # the URI is still shown, without its password
    s3 = boto3.client("s3", endpoint_url=s3_server.url)
    records |= {f"s3 {k}": s3.get_object(Bucket="orbitgen", Key=k)["Body"].read() for k in s3_keys(s3_server, trained.root)}
    # Ray's view of the training (its Train state API, what the dashboard shows), open to any caller.
    with urllib.request.urlopen(f"{cluster.head.dashboard}/api/train/v2/runs/v1", timeout=30) as answer:
        records["ray train runs"] = answer.read()
    assert b"WorkerConfig(run_id=" in records["ray train runs"]   # the loop config is there, as its summary
    client = MlflowClient(mlflow_server.url)
    records |= {f"mlflow {k}": v for k, v in mlflow_texts(client, run_id(trained.proc), tmp_path).items()}
    version = client.get_model_version(trained.model, "1")
    records |= {f"model tag {k}": f"{k}={v}" for k, v in version.tags.items()}
    assert any(k.startswith("mlflow artifact") for k in records) and any(k.startswith("s3 ") for k in records)
    found = {where: names for where, text in records.items() if (names := leaks(text, secrets))}
    assert found == {}


def ran_on(cluster: TwoNodes, *classes: str) -> set[str]:
    """The nodes where actors of `classes` ran (each command here is the only one to use its classes)."""
    actors = list_actors(address=cluster.head.dashboard, detail=True, raise_on_missing_output=False, limit=10_000)
    return {a.node_id for a in actors if a.class_name in classes}


def test_eval_and_generate_use_both_nodes(cluster, trained, s3_server):
    # 128 samples: two batches of 64, one for each worker.
    proc = orbitgen(cluster, "eval", f"models:/{trained.model}/1", "--workers", "2", "--num-samples", "128",
                    env=trained.env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "fid" in proc.stdout.lower()
    assert ran_on(cluster, "EvalWorker") == {cluster.worker_id, nodes_head(cluster)}

    out = f"s3://orbitgen/{trained.root}/generated"
    proc = orbitgen(cluster, "models", "generate", f"models:/{trained.model}/1", "--n", "32", "--workers", "2",
                    "--shard-size", "16", "--out", out, env=trained.env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert ran_on(cluster, "_Generator") == {cluster.worker_id, nodes_head(cluster)}
    assert sum(k.endswith(".tar") for k in s3_keys(s3_server, f"{trained.root}/generated/")) == 2
    verify = orbitgen(cluster, "data", "verify", out, env=trained.env)
    assert verify.returncode == 0, verify.stderr[-3000:]


def nodes_head(cluster: TwoNodes) -> str:
    from ray.util.state import list_nodes

    [head] = [n.node_id for n in list_nodes(address=cluster.head.dashboard, detail=True, raise_on_missing_output=False)
              if n.is_head_node]
    return head


def test_a_training_outlives_its_worker_node(cluster, s3_server, mlflow_server):
    """The worker node goes away after the first checkpoint; a new node joins; the training restarts
    its workers from that checkpoint (checkpoint.max_failures) and ends registered."""
    root = f"restart-{uuid.uuid4().hex[:8]}"
    env = command_env(cluster, ORBITGEN_STORAGE=f"s3://orbitgen/{root}", MLFLOW_TRACKING_URI=mlflow_server.url,
                      RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2")   # Ray Train registers checkpoints sooner
    args = train_args(cluster, f"name={root}", f"tracking.registry_model={root}-dcgan", "train.steps=200",
                      "train.log_every=1", "checkpoint.max_failures=2")
    proc = subprocess.Popen([str(BIN / "orbitgen"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 300
        # Ray writes its checkpoint manager's snapshot on registering a checkpoint: one to resume from.
        while not any(k.endswith("checkpoint_manager_snapshot.json") for k in s3_keys(s3_server, f"{root}/runs/")):
            assert proc.poll() is None and time.monotonic() < deadline, "no registered checkpoint"
            time.sleep(0.2)
        stopped_at = time.time()
        cluster.replace_worker()
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-4000:]
    client, run = MlflowClient(mlflow_server.url), run_id(subprocess.CompletedProcess(args, 0, stdout, stderr))
    resumed = [int(m.value) for m in client.get_metric_history(run, "resumed_from_step")]
    before = [m.step for m in client.get_metric_history(run, "loss_D") if m.timestamp <= stopped_at * 1000]
    # Each restart resumes from a checkpoint, never from scratch. A lost node may cost two restarts
    # (seen here once: the first restart failed as well, both from step 10; five reruns restarted
    # once), which checkpoint.max_failures=2 covers.
    assert 1 <= len(resumed) <= 2 and resumed == sorted(resumed), (resumed, stderr[-4000:])
    assert all(r > 0 and r % 10 == 0 for r in resumed), resumed
    assert before and resumed[0] <= max(before) < 200, f"the stop did not land mid-run: {before}"
    assert [v.version for v in client.search_model_versions(f"name='{root}-dcgan'")] == ["1"]


def test_a_search_runs_its_trials_on_both_nodes(cluster, s3_server, mlflow_server):
    root = f"search-{uuid.uuid4().hex[:8]}"
    env = command_env(cluster, ORBITGEN_STORAGE=f"s3://orbitgen/{root}", MLFLOW_TRACKING_URI=mlflow_server.url)
    sets = ["search.candidates=[HorizontalFlip,VerticalFlip,Invert,Rotate]", "search.k=2", "search.repeats=1",
            "search.mse_min=0.005", "search.concurrency=2", "search.validate.top_m=2", "search.validate.trials=2",
            "search.validate.budget_steps=4", "search.validate.seeds=1", "scaling.num_workers=1", "scaling.placement_strategy=PACK"]
    proc = orbitgen(cluster, "search", "mineaug", "jobs/specs/quickstart.yaml", "--set", f"workdir={cluster.work}",
                    *[a for s in [*TINY, *sets] for a in ("--set", s)], env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    keys = s3_keys(s3_server, root)
    assert any("/stage1/" in k for k in keys) and any("/stage2/" in k for k in keys)
    actors = list_actors(address=cluster.head.dashboard, detail=True, raise_on_missing_output=False, limit=10_000)
    trials = {a.node_id for a in actors if a.class_name not in ("RayTrainWorker", "EvalWorker", "_Generator")}
    assert cluster.worker_id in trials, {(a.class_name, a.node_id) for a in actors}


HOLD = """
import sys, ray
from ray.util.placement_group import placement_group
ray.init(address=sys.argv[1], log_to_driver=False)
pg = placement_group([{"CPU": 2}, {"CPU": 2}], strategy="STRICT_SPREAD")
ray.get(pg.ready())
print("held", flush=True)
sys.stdin.read()   # until the test lets go
"""


def waiting_lines_while_busy(cluster: TwoNodes, args: list[str], env: dict[str, str]) -> tuple[int, list[str]]:
    """Runs `orbitgen ARGS` while other work holds every CPU of the cluster, lets go once the
    command says what it waits for (or after 180 s: no hang); (its exit code, its console lines)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, cluster.head.gcs_address], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=command_env(cluster))
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = subprocess.Popen([str(BIN / "orbitgen"), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, env={**env, "ORBITGEN_WAIT_REPORT_S": "1"}, cwd=REPO)
        lines: list[str] = []

        def read() -> None:   # the console's lines go to stderr
            for line in proc.stderr:
                lines.append(line)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        deadline = time.monotonic() + 180
        while not any("waiting for" in line for line in lines) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        holder.stdin.close()        # the other work ends: the CPUs are free
        proc.wait(timeout=600)
        reader.join(timeout=30)
    finally:
        holder.kill()
    return proc.returncode, lines


def test_commands_waiting_for_busy_nodes_say_what_they_wait_for(cluster, trained):
    """Every CPU of the cluster is held by other work: a training, a search and an evaluation
    neither fail nor sit silent; each says what it waits for, and runs once the CPUs are free."""
    code, lines = waiting_lines_while_busy(
        cluster, train_args(cluster, f"name={trained.root}-wait", "tracking.registry_model=null"), trained.env)
    assert code == 0, "".join(lines)[-4000:]
    waited = [line for line in lines if "waiting for" in line]
    assert waited and "waiting for 2 training workers × {CPU: 1}: 0 of 4 CPUs free (other work holds the rest)" in waited[0]

    code, lines = waiting_lines_while_busy(
        cluster, ["search", "mineaug", "jobs/specs/quickstart.yaml", "--set", f"workdir={cluster.work}",
                  *[a for s in [*TINY, "search.candidates=[HorizontalFlip,Invert]", "search.k=1", "search.repeats=1",
                                 "search.concurrency=1"] for a in ("--set", s)]],
        {**trained.env, "ORBITGEN_STORAGE": f"s3://orbitgen/{trained.root}-search-wait"})
    assert code == 0, "".join(lines)[-4000:]
    waited = [line for line in lines if "waiting for" in line]
    assert waited and re.search(r"waiting for (1 search trial|[2-9] search trials) × \{CPU: 1\}: 0 of 4 CPUs free "
                                r"\(other work holds the rest\)", waited[0]), waited[0]

    code, lines = waiting_lines_while_busy(
        cluster, ["eval", f"models:/{trained.model}/1", "--workers", "2", "--num-samples", "128"], trained.env)
    assert code == 0, "".join(lines)[-4000:]
    waited = [line for line in lines if "waiting for" in line]
    # Each evaluation worker asks for its node's CPUs (two workers, two 2-CPU nodes: jobs/eval/resources.py).
    assert waited and "waiting for 2 evaluation workers × {CPU: 2}: 0 of 4 CPUs free (other work holds the rest)" in waited[0]


def test_an_experiment_whose_artifacts_go_to_a_local_folder_is_refused(cluster, s3_server, mlflow_server):
    """A tracking server that hands out a folder for artifacts (one started without
    --artifacts-destination does): rank 0 would write the run's artifacts to its own node's disk."""
    name = f"local-artifacts-{uuid.uuid4().hex[:8]}"
    MlflowClient(mlflow_server.url).create_experiment(name, artifact_location="file:///var/lib/mlflow/artifacts")
    env = command_env(cluster, ORBITGEN_STORAGE=f"s3://orbitgen/{name}", MLFLOW_TRACKING_URI=mlflow_server.url)
    proc = orbitgen(cluster, *train_args(cluster, f"name={name}"), env=env, timeout_s=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = error_line(proc)
    assert f"the artifact location of MLflow experiment '{name}': file:///var/lib/mlflow/artifacts" in line
    assert "--artifacts-destination" in line
    client = MlflowClient(mlflow_server.url)
    assert client.search_runs([client.get_experiment_by_name(name).experiment_id]) == []   # no run started
    # doctor says the same before a job is tried.
    doctor = orbitgen(cluster, "doctor", "jobs/specs/quickstart.yaml", "--set", f"name={name}", env=env, timeout_s=180)
    assert doctor.returncode == 1 and "file:///var/lib/mlflow/artifacts" in doctor.stdout + doctor.stderr
