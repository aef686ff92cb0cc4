"""MLflow: experiment per spec name, the run's tags, params, dataset lineage and step metrics.

The driver owns the run (creates it, marks it failed on error); rank 0 of the training workers
logs step metrics and images into it by run id through `RunLogger`, which keeps what a server
gone away did not take (jobs/tracking/buffered.py).
"""
from __future__ import annotations

import base64
import io
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

import mlflow
import numpy as np
from PIL import Image
from mlflow.tracking import MlflowClient

from jobs.runtime.redact import redact_json
from jobs.tracking.buffered import RecordBuffer

TAG_FAMILY = "orbitgen.family"
TAG_DATA = "orbitgen.data_fingerprint"
TAG_GIT = "orbitgen.git_sha"
TAG_SPEC = "orbitgen.spec_sha"
TAG_SEARCH = "orbitgen.search_run"   # the MineAug search that chose augment.mineaug
CLOSE_S = 10.0   # a worker's last wait for the server: the driver replays what is left, with its own bound


def is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


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
