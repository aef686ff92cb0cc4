"""Which MLflow store answers what: runs live in the tracking store; registered models in
$MLFLOW_REGISTRY_URI when it is set (a registry shared by several tracking servers), else in the
tracking store too. Every registry call of orbitgen goes through `registry_uri`, so no call
passes the tracking URI as the registry and overrides the variable.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from mlflow.tracking import MlflowClient

REGISTRY_ENV = "MLFLOW_REGISTRY_URI"


def registry_uri(tracking_uri: str | None) -> str | None:
    """The registry that goes with `tracking_uri`: $MLFLOW_REGISTRY_URI, else the tracking store."""
    return os.environ.get(REGISTRY_ENV) or tracking_uri


def client(tracking_uri: str | None = None) -> MlflowClient:
    """A client of `tracking_uri` (default: the process's current one) whose registry calls go to
    `registry_uri(tracking_uri)`."""
    import mlflow

    tracking_uri = tracking_uri or mlflow.get_tracking_uri()
    return MlflowClient(tracking_uri, registry_uri=registry_uri(tracking_uri))


@contextmanager
def registry_used(tracking_uri: str) -> Iterator[None]:
    """MLflow's own registry calls (`log_model(registered_model_name=...)`) into `registry_uri(tracking_uri)`.

    `mlflow.set_registry_uri` also writes $MLFLOW_REGISTRY_URI: both are put back, or a later job
    in this process would register into this one's registry."""
    import mlflow
    from mlflow.tracking._model_registry import utils

    before, env = utils._registry_uri, os.environ.get(REGISTRY_ENV)
    mlflow.set_registry_uri(registry_uri(tracking_uri))
    try:
        yield
    finally:
        utils._registry_uri = before
        if env is None:
            os.environ.pop(REGISTRY_ENV, None)
        else:
            os.environ[REGISTRY_ENV] = env
