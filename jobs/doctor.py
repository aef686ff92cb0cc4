"""`orbitgen doctor`: the environment a job spec will run in, checked before a long job fails in it.

Each check says what it looked at, whether it is fine, and, when not, how to fix it. Checks only
read or probe (a TCP connect, joining the cluster RAY_ADDRESS names to read its nodes, one small
file written and removed in run storage); none starts a job, creates an MLflow run or builds data.
Against a cluster whose nodes share no disk, storage, data and tracking must be ones every node
reaches (jobs/placement.py); what the spec asks for must fit its nodes (jobs/capacity.py).
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

from data_shards.builtin import is_builtin
from data_shards.endpoint import unanswered
from data_shards.errors import EnvironmentProblem, UserError
from data_shards.storage import filesystem, storage_problem
from jobs.capacity import fits_ever, training_demand, unfitting
from jobs.inputs import MISSING_FILES, DataMismatch, check_data, missing_files
from jobs.placement import Place, artifact_place, builtin_home, data_location, local_path, refuse_unshared
from jobs.runtime.cluster import Cluster
from jobs.runtime.redact import redact
from jobs.spec import JobSpec, SpecError
from jobs.tracking.store_check import check_answers


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _unshared(spec: JobSpec, cluster: Cluster | None, key: str, url: str) -> str | None:
    """Why no node but this one reaches `url` (jobs/placement.py), or None."""
    try:
        refuse_unshared(cluster or LOCAL, [Place(key, url)], spec.storage.shared_mounts)
    except SpecError as e:
        return str(e)
    return None


def _tracking(spec: JobSpec, cluster: Cluster | None) -> Check:
    uri = spec.tracking_uri()
    key = "tracking.uri" if spec.tracking.uri else "MLFLOW_TRACKING_URI"
    try:
        check_answers(uri, key)
    except UserError as e:
        return Check("tracking", False, str(e), "start the MLflow server (python infra/local_stack.py starts one) "
                                                "or set tracking.uri / MLFLOW_TRACKING_URI to one that runs")
    if why := _unshared(spec, cluster, key, uri):
        return Check("tracking", False, why, "run an MLflow server every node reaches (infra/mlflow/README.md)")
    if cluster is not None and cluster.spans_machines and local_path(uri) is None:
        from mlflow.tracking import MlflowClient

        # An experiment made before (a new one gets the server's default, checked when the job starts).
        if (exp := MlflowClient(uri).get_experiment_by_name(spec.experiment)) is not None:
            place = artifact_place(uri, exp.experiment_id)
            if why := _unshared(spec, cluster, place.key, place.url):
                return Check("tracking", False, why, "serve artifacts through the MLflow server "
                                                     "(mlflow server --artifacts-destination s3://…)")
    return Check("tracking", True, redact(uri))


def _store_failure(name: str, e: Exception, url: str) -> Check | None:
    """A failed check whose cause is the store at `url` (no credentials, access denied, a bucket
    that does not exist, an endpoint nobody answers, a full or forbidden disk), named with that
    store's own fix (data_shards/storage.py `storage_problem`); None when `e` is something else."""
    problem = storage_problem(e, url)
    if problem is None or (problem is e and not isinstance(e, EnvironmentProblem)):
        return None   # a bug, or bad input whose message the caller explains
    fix = getattr(problem, "fix", None) or "do what the line above says, or choose a place you can read and write"
    return Check(name, False, str(problem).removesuffix(f"; {fix}"), fix)


def _storage(spec: JobSpec, cluster: Cluster | None) -> Check:
    """Run storage takes a file and gives it back, and every node reaches it: what every checkpoint needs."""
    url = spec.storage_url()
    if why := _unshared(spec, cluster, "checkpoint.storage" if spec.checkpoint.storage else "storage.root", url):
        return Check("storage", False, why, "set ORBITGEN_STORAGE (or storage.root) to an s3:// URL every node "
                                            "reaches")
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if url.startswith("s3://") and endpoint and (why := unanswered(endpoint)):
        return Check("storage", False, f"{url}: the S3 endpoint AWS_ENDPOINT_URL={endpoint} does not answer ({why})",
                     "start the S3 server or correct AWS_ENDPOINT_URL")
    fs, root = filesystem(url)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols:
        # Local: nothing made; the folder, or the nearest one that exists above it, must be writable.
        folder = Path(root)
        while not folder.exists():
            folder = folder.parent
        ok = os.access(folder, os.W_OK | os.X_OK)
        return Check("storage", ok, url, "" if ok else f"{folder} is not writable: set checkpoint.storage elsewhere")
    probe = f"{root.rstrip('/')}/.orbitgen-doctor-{uuid.uuid4().hex[:8]}"
    try:
        fs.pipe_file(probe, b"ok")
        back = fs.cat_file(probe)
        fs.rm_file(probe)
    except Exception as e:   # any failure here is the answer: credentials, bucket, permissions
        if (failed := _store_failure("storage", e, url)) is not None:
            return failed
        return Check("storage", False, f"{url}: cannot write and read back a file ({type(e).__name__}: {e})",
                     "set checkpoint.storage to a folder or bucket you can write, with AWS credentials for s3://")
    return Check("storage", back == b"ok", url, "" if back == b"ok" else "storage returned other bytes than written")


def _data(spec: JobSpec, cluster: Cluster | None) -> Check:
    """The runner's own check of the shard set against the spec, without building a built-in set."""
    where = data_location(spec, builtin_home(spec, cluster or LOCAL))
    if why := _unshared(spec, cluster, "data.train", where):
        return Check("data", False, why, "build the shards in object storage, or set ORBITGEN_STORAGE for "
                                         "built-in sets")
    if is_builtin(spec.data.train):
        return Check("data", True, f"{spec.data.train} (built in, made on first use under {where})")
    try:
        card = check_data(spec, spec.data.train)
    except Exception as e:   # unreadable, absent or not matching the spec: the message names it
        if (failed := _store_failure("data", e, spec.data.train)) is not None:
            return failed   # the store stopped the read: building the set again would not help
        fix = ("set data.channels/resolution to match it, or point data.train at another shard set"
               if isinstance(e, DataMismatch) else
               "build it with `orbitgen data build SOURCE DEST`, or point data.train at a built shard set")
        return Check("data", False, str(e), fix)
    return Check("data", True, f"{spec.data.train} ({card['count']} images)")


def _files(spec: JobSpec, cluster: Cluster | None) -> Check:
    """The local files the spec needs, as the driver checks them (jobs/inputs.missing_files)."""
    if missing := missing_files(spec):
        return Check("files", False, f"{MISSING_FILES}: " + "; ".join(missing),
                     "copy the files to this machine and set them with --set KEY=PATH")
    needed = spec.make_family().required_files()
    return Check("files", True, f"{len(needed)} named file(s) present" if needed else "none needed")


def _local_ray() -> Cluster:
    """The Ray that `train` would start here, described without starting it."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return Cluster(nodes=({"CPU": float(os.cpu_count() or 1), **({"GPU": float(gpus)} if gpus else {})},), local=True)


LOCAL = Cluster(nodes=({},), local=True)   # where placement does not depend on the cluster's size


def _join(address: str) -> Cluster:
    """The cluster at `address` (a GCS address), joined only to read its nodes."""
    import ray

    from jobs.runtime.cluster import current

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, configure_logging=False, include_dashboard=False)
    return current()


def _ray(spec: JobSpec, cluster: Cluster | None) -> Check:
    address = os.environ.get("RAY_ADDRESS")
    if address:
        if address.startswith(("http://", "https://")):
            return Check("ray", False, f"RAY_ADDRESS={address} is a cluster's Jobs API, which a driver cannot join",
                         f"submit with `orbitgen jobs submit SPEC --address {address}`, or set RAY_ADDRESS to the "
                         "cluster's GCS address (HEAD:6379)")
        if cluster is None:
            target = address if "://" in address else f"tcp://{address}"
            why = unanswered(target.replace("ray://", "tcp://")) or "it did not let this machine join"
            return Check("ray", False, f"RAY_ADDRESS={address}: nobody answers ({why})",
                         "start the cluster (ray up ray_cluster.yaml) or unset RAY_ADDRESS to train on this machine")
        if why := unfitting(training_demand(spec), cluster):
            return Check("ray", False, *why)
        return Check("ray", True, f"cluster at {address}: {cluster.describe()}")
    here = cluster or _local_ray()
    demand = training_demand(spec)
    # GPUs are the next check's: here, whether the CPUs fit.
    if why := unfitting(replace(demand, bundle={"CPU": demand.bundle["CPU"]}), here):
        return Check("ray", False, *why)
    return Check("ray", True, f"local Ray on {here.describe()}")


def _gpus(spec: JobSpec, cluster: Cluster | None) -> Check:
    import torch

    if os.environ.get("RAY_ADDRESS"):
        gpus = (cluster.totals().get("GPU", 0.0) if cluster else 0.0)
        if not spec.scaling.use_gpu:
            return Check("gpus", True, f"not used ({gpus:g} in the cluster)")
        if cluster is None:
            return Check("gpus", False, "the cluster could not be read", "fix the ray check first")
        if not fits_ever(training_demand(spec), cluster):
            return Check("gpus", False, f"{gpus:g} GPU(s) in the cluster ({cluster.describe()}); the spec wants one "
                                        f"per worker ({spec.scaling.num_workers})",
                         "--set scaling.use_gpu=false, fewer workers, or GPU nodes")
        return Check("gpus", True, f"{gpus:g} in the cluster" + (" (an autoscaler may add more)" * cluster.can_grow))
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not spec.scaling.use_gpu:
        return Check("gpus", True, f"not used ({count} visible)")
    if count < spec.scaling.num_workers:
        return Check("gpus", False, f"{count} GPU(s) visible here, the spec wants one per worker "
                                    f"({spec.scaling.num_workers})",
                     "--set scaling.use_gpu=false to train on CPUs, or fewer workers, or a GPU cluster")
    return Check("gpus", True, f"{count} visible: {torch.cuda.get_device_name(0)}")


CHECKS: tuple[Callable[[JobSpec, Cluster | None], Check], ...] = (_ray, _gpus, _tracking, _storage, _data, _files)


def cluster_of(address: str | None) -> Cluster | None:
    """The cluster a job would run on: the one RAY_ADDRESS names (None when it cannot be joined),
    else the Ray `train` would start on this machine."""
    if not address:
        return _local_ray()
    if address.startswith(("http://", "https://")):
        return None
    try:
        return _join(address)
    except Exception:   # the ray check says why, from a TCP probe
        return None


def diagnose(spec: JobSpec) -> Iterator[Check]:
    cluster = cluster_of(os.environ.get("RAY_ADDRESS"))
    for check in CHECKS:
        yield check(spec, cluster)
