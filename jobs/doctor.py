"""`orbitgen doctor`: the environment a job spec will run in, checked before a long job fails in it.

Each check says what it looked at, whether it is fine, and, when not, how to fix it. Checks only
read or probe (a TCP connect, one small file written and removed in run storage); none starts a
job, creates an MLflow run or builds data.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from data_shards.builtin import is_builtin
from data_shards.endpoint import unanswered
from data_shards.errors import UserError
from data_shards.storage import filesystem
from jobs.runtime.redact import redact
from jobs.inputs import check_data, check_files
from jobs.spec import JobSpec, SpecError
from jobs.tracking.store_check import check_answers


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _tracking(spec: JobSpec) -> Check:
    uri = spec.tracking_uri()
    try:
        check_answers(uri, "tracking.uri" if spec.tracking.uri else "MLFLOW_TRACKING_URI")
    except UserError as e:
        return Check("tracking", False, str(e), "start the MLflow server (python infra/local_stack.py starts one) "
                                                "or set tracking.uri / MLFLOW_TRACKING_URI to one that runs")
    return Check("tracking", True, redact(uri))


def _storage(spec: JobSpec) -> Check:
    """Run storage takes a file and gives it back: what every checkpoint needs."""
    url = spec.storage_url()
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
        return Check("storage", False, f"{url}: cannot write and read back a file ({type(e).__name__}: {e})",
                     "set checkpoint.storage to a folder or bucket you can write, with AWS credentials for s3://")
    return Check("storage", back == b"ok", url, "" if back == b"ok" else "storage returned other bytes than written")


def _data(spec: JobSpec) -> Check:
    """The runner's own check of the shard set against the spec, without building a built-in set."""
    if is_builtin(spec.data.train):
        return Check("data", True, f"{spec.data.train} (built in, made on first use)")
    try:
        card = check_data(spec, spec.data.train)
    except Exception as e:   # unreadable, absent or not matching the spec: the message names it
        return Check("data", False, str(e), "build it with `orbitgen data build SOURCE DEST`, point data.train "
                                            "at a built shard set, or set data.channels/resolution to match it")
    return Check("data", True, f"{spec.data.train} ({card['count']} images)")


def _files(spec: JobSpec) -> Check:
    """The runner's check of the local files the family needs (eval weights: the spec checks them)."""
    try:
        check_files(spec)
    except SpecError as e:
        return Check("files", False, str(e).replace("\n", ";"), "copy the files to this machine and set them "
                                                                 "with --set KEY=PATH")
    needed = spec.make_family().required_files()
    return Check("files", True, f"{len(needed)} named file(s) present" if needed else "none needed")


def _ray(spec: JobSpec) -> Check:
    address = os.environ.get("RAY_ADDRESS")
    if address:
        target = address if "://" in address else f"tcp://{address}"
        why = unanswered(target.replace("ray://", "tcp://"))
        if why:
            return Check("ray", False, f"RAY_ADDRESS={address}: nobody answers ({why})",
                         "start the cluster (ray up ray_cluster.yaml) or unset RAY_ADDRESS to train on this machine")
        return Check("ray", True, f"cluster at {address}")
    need = spec.scaling.num_workers * spec.scaling.cpus_per_worker
    have = os.cpu_count() or 1
    if need > have:
        return Check("ray", False, f"a local Ray here has {have} CPUs; the spec asks for {need:g} "
                                   f"({spec.scaling.num_workers} workers × {spec.scaling.cpus_per_worker:g})",
                     f"--set scaling.num_workers={max(1, int(have // spec.scaling.cpus_per_worker))}, or set RAY_ADDRESS "
                     "to a cluster")
    return Check("ray", True, f"local Ray on this machine ({have} CPUs, {need:g} needed)")


def _gpus(spec: JobSpec) -> Check:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not spec.scaling.use_gpu:
        return Check("gpus", True, f"not used ({count} visible)")
    if os.environ.get("RAY_ADDRESS"):
        return Check("gpus", True, "on the cluster's nodes (not checked from here)")
    if count < spec.scaling.num_workers:
        return Check("gpus", False, f"{count} GPU(s) visible here, the spec wants one per worker "
                                    f"({spec.scaling.num_workers})",
                     "--set scaling.use_gpu=false to train on CPUs, or fewer workers, or a GPU cluster")
    return Check("gpus", True, f"{count} visible: {torch.cuda.get_device_name(0)}")


CHECKS: tuple[Callable[[JobSpec], Check], ...] = (_ray, _gpus, _tracking, _storage, _data, _files)


def diagnose(spec: JobSpec) -> Iterator[Check]:
    for check in CHECKS:
        yield check(spec)
