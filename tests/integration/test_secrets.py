"""No secret in what a run writes down: `orbitgen train` as a user runs it, with
recognisable AWS keys and an MLflow token in the environment and a password in the tracking URI,
against the real MLflow server, run storage on the real S3 server. Everything the run left in
MLflow (params, tags, metric names, every artifact, the registered model's files and tags) and
everything it printed is searched for each secret."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from jobs.runtime.env import tracking_uri_restored
from secret_scan import mlflow_texts

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
MODEL = "secrets-test"
SECRETS = {"AWS_ACCESS_KEY_ID": "AKIAORBITGENTEST7Q2Z", "AWS_SECRET_ACCESS_KEY": "orbitgen-s3-secret-9f41c2d7",
           "MLFLOW_TRACKING_TOKEN": "orbitgen-mlflow-token-3b8e"}
URI_PASSWORD = "orbitgen-uri-password-51ac"


def test_no_secret_in_mlflow_or_on_the_console(mlflow_server, s3_server, tmp_path):
    host = urlsplit(mlflow_server.url).netloc
    tracking_uri = f"http://trainer:{URI_PASSWORD}@{host}"
    env = {**os.environ, **SECRETS, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    sets = [f"workdir={tmp_path}", "data.train=builtin:craters?count=64&seed=0", "data.resolution=16",
            "data.shuffle_buffer=16", "data.loader_workers=0", "model.nz=8", "model.ngf=8", "model.ndf=8",
            "train.batch=8", "train.steps=4", "train.log_every=2", "checkpoint.every_steps=4", "eval.num_samples=16",
            f"tracking.uri={tracking_uri}", f"tracking.registry_model={MODEL}", "checkpoint.storage=s3://orbitgen/runs"]
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "train", "jobs/specs/quickstart.yaml",
                           *[a for s in sets for a in ("--set", s)]],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-3000:]
    assert "trainer:***@" in console   # the URI is still shown, without its password

    client = MlflowClient(mlflow_server.url)
    runs = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    records = {"console": console}
    for run in runs:
        records |= {f"{run.info.run_id[:8]} {k}": v for k, v in mlflow_texts(client, run.info.run_id, tmp_path / "dl").items()}
    assert "model        models:/" in console, console[-3000:]
    version = client.get_model_version(MODEL, "1")
    records |= {f"model tag {k}": f"{k}={v}" for k, v in version.tags.items()}
    with tracking_uri_restored():   # models:/ URIs resolve through the process's tracking URI
        mlflow.set_tracking_uri(mlflow_server.url)
        model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/1", dst_path=str(tmp_path / "model")))
    records |= {f"model file {p.name}": p.read_bytes().decode("latin-1") for p in model_dir.rglob("*") if p.is_file()}
    assert any(k.endswith("spec.yaml") for k in records) and any(k.startswith("model file") for k in records)

    leaks = [(where, name) for where, text in records.items()
             for name, secret in {**SECRETS, "password in the tracking URI": URI_PASSWORD}.items() if secret in text]
    assert not leaks, (leaks, [line for line in console.splitlines() if URI_PASSWORD in line][:5])
