"""Where a job's files may live, decided in one place: on one machine anywhere; on a cluster whose
nodes share no disk, only where every node reaches (object storage, or a folder every node
mounts, declared in `storage.shared_mounts`).

Checked on the driver before anything starts, so that a worker on another node never meets a
path that exists only on the driver's machine. A refusal is one line: the spec key, the path,
and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from data_shards.builtin import is_builtin
from jobs.runtime.cluster import Cluster
from jobs.runtime.redact import redact
from jobs.spec import JobSpec, SpecError

# Schemes of stores every node reaches through the network.
_LOCAL_SCHEMES = ("", "file", "local", "sqlite")


def local_path(url: str) -> str | None:
    """The path on this machine's disk that `url` names, or None for a store behind the network."""
    parsed = urlparse(url)
    if parsed.scheme not in _LOCAL_SCHEMES:
        return None
    if parsed.scheme == "sqlite":   # sqlite:////abs/path.db (or sqlite:///relative.db)
        return url.removeprefix("sqlite:///")
    return parsed.path or url


def shared(url: str, mounts: list[str]) -> bool:
    """True when every node of a cluster reaches `url`."""
    path = local_path(url)
    if path is None:
        return True
    resolved = Path(path).expanduser().absolute()
    return any(resolved.is_relative_to(Path(m).expanduser().absolute()) for m in mounts)


@dataclass(frozen=True)
class Place:
    key: str     # the spec key (or variable) that names it, as the refusal says it
    url: str


def refuse_unshared(cluster: Cluster, places: list[Place], mounts: list[str] = ()) -> None:
    """SpecError naming the first place a node of `cluster` could not reach (one machine: none);
    `mounts`: the spec's storage.shared_mounts."""
    if not cluster.spans_machines:
        return
    for place in places:
        if place.url and not shared(place.url, list(mounts)):
            raise SpecError(f"{place.key}: {redact(place.url)} is on this machine's disk, and the cluster's nodes "
                            f"({cluster.describe()}) do not share it; {_fix(place.key)}")


def _fix(key: str) -> str:
    declare = "or declare a folder every node mounts with --set storage.shared_mounts=[/mnt/shared]"
    if key in ("tracking.uri", "MLFLOW_TRACKING_URI"):
        return "track to an MLflow server every node reaches (tracking.uri: http://HOST:5000)"
    if key.startswith("the artifact location"):
        return ("start the MLflow server with --artifacts-destination s3://bucket/mlflow (its clients then send "
                "artifacts through it), or use an experiment whose artifact location is in object storage")
    if key.startswith(("data.train", "--data", "--inputs")):
        return ("put the shards in object storage (`orbitgen data build SOURCE s3://bucket/shards/NAME`, or set "
                "storage.root / ORBITGEN_STORAGE for built-in sets), " + declare)
    if key == "storage.root":
        return f"set storage.root or ORBITGEN_STORAGE to an s3:// URL, {declare}"
    return f"set {key} (or storage.root / ORBITGEN_STORAGE) to an s3:// URL, {declare}"


def training_places(spec: JobSpec, *, data_url: str, tracking_uri: str, storage: str | None = None) -> list[Place]:
    """What a training's workers (or a search's trials) read and write besides what the driver
    ships them; `storage`: the search's folder instead of the run storage."""
    tracking_key = "tracking.uri" if spec.tracking.uri else "MLFLOW_TRACKING_URI"
    return [Place("data.train", data_url),
            Place("checkpoint.storage" if spec.checkpoint.storage else "storage.root", storage or spec.storage_url()),
            Place(tracking_key, tracking_uri)]


def artifact_place(tracking_uri: str, experiment_id: str) -> Place:
    """Where a tracking server keeps an experiment's artifacts. MLflow clients write them there
    themselves: a path (a server started without --artifacts-destination hands out its own folder)
    lands on each node's own disk; s3:// and the server's mlflow-artifacts: are behind the network."""
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient(tracking_uri).get_experiment(experiment_id)
    return Place(f"the artifact location of MLflow experiment {experiment.name!r}", experiment.artifact_location or "")


def data_location(spec: JobSpec, home: str) -> str:
    """Where the training data will be: `data.train`, or for a built-in set, under `home`
    (`builtin_home`), where it is made."""
    return home if is_builtin(spec.data.train) else spec.data.train


def builtin_home(spec: JobSpec, cluster: Cluster) -> str:
    """Where a built-in data set is made: under the storage root when nodes share no disk (written
    once, read by every node from there), else under the workdir."""
    root = spec.storage_root()
    if cluster.spans_machines and root:
        return f"{root.rstrip('/')}/shards"
    return str(spec.workdir_path() / "shards")
