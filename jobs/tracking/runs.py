"""MLflow: experiment per spec name, the run's tags, params, dataset lineage and step metrics.

The driver owns the run (creates it, marks it failed on error); rank 0 of the training workers
logs step metrics and images into it by run id through `RunLogger`, which keeps what a server
gone away did not take (jobs/tracking/buffered.py).

Links: `run_link`, `experiment_link` and `version_link` give the tracking server's page for what a
command made (`{uri}/#/experiments/{exp}/runs/{run}`, `{uri}/#/models/{name}/versions/{v}`, as
MLflow's UI routes them) when the tracking URI is http(s), password masked; for a local store
there is no page to link, so they give the `mlflow ui` command that serves one.
"""
from __future__ import annotations

import base64
import io
import time
import warnings
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import quote

import mlflow
import numpy as np
from PIL import Image
from mlflow.tracking import MlflowClient

from jobs.runtime.redact import redact, redact_json
from jobs.tracking.buffered import RecordBuffer

TAG_FAMILY = "orbitgen.family"
TAG_DATA = "orbitgen.data_fingerprint"
TAG_GIT = "orbitgen.git_sha"
TAG_SPEC = "orbitgen.spec_sha"
TAG_SEARCH = "orbitgen.search_run"   # the MineAug search that chose augment.mineaug
CLOSE_S = 10.0   # a worker's last wait for the server: the driver replays what is left, with its own bound


def is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def is_http(tracking_uri: str) -> bool:
    """A tracking server (it has web pages to link), not a local store."""
    return tracking_uri.startswith(("http://", "https://"))


def _ui_base(tracking_uri: str) -> str | None:
    """The server's web address (password masked), or None for a store no server serves."""
    if not is_http(tracking_uri):
        return None
    return redact(tracking_uri).rstrip("/")


def ui_command(tracking_uri: str) -> str:
    """The command that serves the UI of a local store."""
    return f"mlflow ui --backend-store-uri {redact(tracking_uri)} --port 5000"


def _link(tracking_uri: str, route: str) -> str:
    base = _ui_base(tracking_uri)
    return f"{base}/#/{route}" if base else f"open it with: {ui_command(tracking_uri)}"


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page on the tracking server, or the `mlflow ui` command for a local store."""
    return _link(tracking_uri, f"experiments/{experiment_id}/runs/{run_id}")


def experiment_link(tracking_uri: str, experiment_id: str) -> str:
    return _link(tracking_uri, f"experiments/{experiment_id}")


def version_link(tracking_uri: str, name: str, version: str) -> str:
    """A registered model version's page (the name quoted: it may hold spaces or slashes)."""
    return _link(tracking_uri, f"models/{quote(name, safe='')}/versions/{version}")


def ensure_experiment(tracking_uri: str, name: str, local_artifacts: Path) -> str:
    """Experiment id for `name`; a local store keeps artifacts beside it, not in ./mlruns."""
    mlflow.set_tracking_uri(tracking_uri)
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = local_artifacts.as_uri() if is_local_store(tracking_uri) else None
    return mlflow.create_experiment(name, artifact_location=location)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:500]
    return out


def log_dataset(url: str, card: Mapping[str, Any]) -> None:
    """Dataset lineage: the shard set's manifest as the source, its content fingerprint as the digest."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # "can be interpreted in multiple ways": both readings are local files
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(url.rstrip("/") + "/manifest.parquet")
    mlflow.log_input(MetaDataset(source, name=Path(url.rstrip("/")).name, digest=card["fingerprint"][:36]),
                     context="train")
    mlflow.log_dict(redact_json(dict(card)), "dataset/dataset.json")



class RunLogger:
    """Logs into an existing run by id (used inside Ray workers, where no active run exists).

    Through a `RecordBuffer` (jobs/tracking/buffered.py): a step never waits on the server, and
    a server gone away mid-run loses nothing; what it has not taken by `close` stays in `spill`
    (the run's storage) for the driver to deliver."""

    def __init__(self, tracking_uri: str, run_id: str, spill: str | None = None):
        self.buffer = RecordBuffer(MlflowClient(tracking_uri), run_id, spill)

    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        ts = int(time.time() * 1000)   # when it was measured, whenever the server gets it
        self.buffer.put("metrics", [[k, float(v), ts, step] for k, v in values.items()])

    def params(self, values: Mapping[str, Any]) -> None:
        self.buffer.put("params", {k: str(v) for k, v in values.items()})

    def image(self, image: np.ndarray, path: str) -> None:
        png = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(png, format="PNG")
        self.buffer.put("image", {"path": path, "png": base64.b64encode(png.getvalue()).decode()})

    def close(self, timeout: float = CLOSE_S) -> int:
        """Wait up to `timeout` s for the server to take everything; returns how many records it did not."""
        return self.buffer.close(timeout)
