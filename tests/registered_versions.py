"""A registered version with scores under an evaluation protocol, made the way the registry tags
one, without training: for tests of promotion against a real MLflow server."""
from __future__ import annotations

from typing import Mapping

from mlflow.tracking import MlflowClient

from jobs.tracking.protocol import EvalProtocol, version_tags


def scored_version(client: MlflowClient, experiment_id: str, name: str, protocol: EvalProtocol,
                   scores: Mapping[str, float]) -> str:
    """A new version of `name` (its own run in `experiment_id`) carrying `scores` under `protocol`."""
    run = client.create_run(experiment_id).info.run_id
    return str(client.create_model_version(name, f"runs:/{run}/generator", run,
                                           tags=version_tags(protocol, scores, run)).version)
