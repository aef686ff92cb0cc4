"""Promotion semantics on a real (sqlite) MLflow registry: champion moves only to a better version."""
from __future__ import annotations

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from jobs.tracking.registry import promote


@pytest.fixture
def client(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("promotion")
    yield MlflowClient(uri)
    mlflow.set_tracking_uri(None)


def _version(client, fid):
    with mlflow.start_run() as run:
        if fid is not None:
            mlflow.log_metric("fid", fid)
        mlflow.log_text("weights", "generator/MLmodel")
    if not client.search_registered_models("name='g'"):
        client.create_registered_model("g")
    return client.create_model_version("g", f"runs:/{run.info.run_id}/generator", run.info.run_id).version


def test_champion_moves_only_to_a_better_version(client):
    v1 = _version(client, 5.0)
    assert promote("g", metric="fid", mode="min", candidate=v1, client=client).promoted
    v2 = _version(client, 7.0)
    p = promote("g", metric="fid", mode="min", candidate=v2, client=client)
    assert not p.promoted and "does not beat" in p.reason
    aliases = client.get_registered_model("g").aliases
    assert aliases == {"champion": v1, "challenger": v2}
    v3 = _version(client, 3.0)
    assert promote("g", metric="fid", mode="min", candidate=v3, client=client).promoted
    assert client.get_registered_model("g").aliases["champion"] == v3


def test_best_version_chosen_without_candidate_and_max_mode(client):
    for fid in (4.0, 2.0, None, 6.0):
        _version(client, fid)
    assert promote("g", metric="fid", mode="min", client=client).candidate == "2"
    # a higher-is-better metric picks the other end and replaces the champion
    p = promote("g", metric="fid", mode="max", client=client)
    assert p.promoted and p.candidate == "4"


def test_unknown_model_or_metric_is_an_error(client):
    with pytest.raises(ValueError, match="no registered model"):
        promote("nope", metric="fid", mode="min", client=client)
    _version(client, None)
    with pytest.raises(ValueError, match="metric 'fid'"):
        promote("g", metric="fid", mode="min", client=client)
