"""Tracking conventions of the standard MLflow variables: with MLFLOW_REGISTRY_URI set, registered
models go to that registry and runs stay in the tracking store (jobs/tracking/stores.py);
MLFLOW_EXPERIMENT_NAME names the experiment of a spec that names none. Local sqlite stores; no
servers, no Ray."""
from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from jobs.runtime.env import tracking_uri_restored
from jobs.spec import SPECS_DIR, parse_spec
from jobs.tracking.lineage import built_on_tag, version_lineage
from jobs.tracking.model_refs import resolve_ref
from jobs.tracking.registry import list_models, log_generator
from jobs.tracking.runs import ensure_experiment
from jobs.tracking.stores import REGISTRY_ENV, client, registry_uri, registry_used
from models.registry import make_family
from models.snapshot import save_snapshot
from tiny_specs import tiny_model

GOOD = (SPECS_DIR / "quickstart.yaml").read_text()
MODEL = "registry-uri"


@pytest.fixture
def stores(tmp_path, monkeypatch):
    """A tracking store, the active experiment in it, and another store as $MLFLOW_REGISTRY_URI."""
    tracking, registry = f"sqlite:///{tmp_path / 'tracking.db'}", f"sqlite:///{tmp_path / 'registry.db'}"
    monkeypatch.setenv(REGISTRY_ENV, registry)
    with tracking_uri_restored():
        mlflow.set_experiment(experiment_id=ensure_experiment(tracking, "registry-uri", tmp_path / "artifacts"))
        yield tracking, registry
        mlflow.set_tracking_uri(None)


def test_the_registry_is_the_variable_else_the_tracking_store(monkeypatch, tmp_path):
    tracking, registry = f"sqlite:///{tmp_path / 't.db'}", f"sqlite:///{tmp_path / 'r.db'}"
    monkeypatch.delenv(REGISTRY_ENV, raising=False)
    assert registry_uri(tracking) == tracking
    assert client(tracking)._registry_uri == tracking
    with registry_used(tracking):
        assert mlflow.get_registry_uri() == tracking
    assert REGISTRY_ENV not in os.environ   # mlflow.set_registry_uri wrote it; a later job must not inherit it
    monkeypatch.setenv(REGISTRY_ENV, registry)
    assert registry_uri(tracking) == registry
    assert client(tracking)._registry_uri == registry
    assert client(tracking).tracking_uri == tracking


def test_a_registered_generator_lands_in_the_registry_store(stores, tmp_path):
    tracking, registry = stores
    fam = make_family("dcgan", tiny_model("dcgan"), resolution=16, channels=1, lr=2e-4)
    save_snapshot(tmp_path / "generator.pt", fam, fam.build()[fam.sampler_role])
    (tmp_path / "spec.yaml").write_text("name: test\n")
    with mlflow.start_run() as run:
        assert log_generator(tmp_path / "generator.pt", tmp_path / "spec.yaml", MODEL) == "1"
    assert os.environ[REGISTRY_ENV] == registry   # put back as it was

    assert [m.name for m in MlflowClient(registry, registry_uri=registry).search_registered_models()] == [MODEL]
    assert MlflowClient(tracking, registry_uri=tracking).search_registered_models() == []
    assert MlflowClient(tracking).get_run(run.info.run_id).info.status == "FINISHED"   # the run stays in tracking
    # Read back through each registry path of jobs/tracking: listing, references, lineage.
    assert [m["name"] for m in list_models()] == [MODEL]
    assert Path(resolve_ref(f"models:/{MODEL}/1", tmp_path / "ref", tracking)).is_file()
    assert version_lineage(client(tracking), MODEL, version="1")["spec"] == "name: test\n"
    assert f'"run_id": "{run.info.run_id}"' in built_on_tag({"g_from": f"models:/{MODEL}/1"}, tracking)["orbitgen.built_on"]


def test_experiment_is_the_spec_s_else_the_variable_else_the_name(monkeypatch):
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    assert parse_spec(GOOD).experiment == parse_spec(GOOD).name
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    assert parse_spec(GOOD).experiment == "from-env"
    assert parse_spec(GOOD, ["tracking.experiment=from-spec"]).experiment == "from-spec"
