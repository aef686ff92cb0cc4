"""The spine end to end on real parts: shards on the S3 server, tracking on the MLflow server,
training on a local Ray with 2 workers, registry promotion, loading the champion with pyfunc."""
from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from data_shards.card import read_card, read_manifest
from data_shards.storage import filesystem
from data_shards.synthetic import crater_field
from data_shards.writer import write_shards
from jobs.train.driver import run_job
from jobs.spec import SPECS_DIR, load_spec

pytestmark = pytest.mark.integration
COUNT, RES = 96, 16
MODEL = "spine-test"


@pytest.fixture(scope="module")
def s3_shards(s3_server):
    url = "s3://orbitgen/shards/craters16"
    card = write_shards(crater_field(COUNT, RES, channels=1, seed=3), url, layout="synthetic:craters",
                        resolution=RES, channels=1, source="test", shard_samples=24, progress=False)
    return url, card


def _spec(tmp_path, shards_url, tracking_uri, *extra):
    return load_spec(SPECS_DIR / "quickstart.yaml", [
        f"workdir={tmp_path}", f"data.train={shards_url}", f"data.resolution={RES}", "data.shuffle_buffer=16",
        f"tracking.uri={tracking_uri}", f"tracking.registry_model={MODEL}", "checkpoint.storage=s3://orbitgen/runs",
        "checkpoint.every_steps=10", "train.batch=16", "train.log_every=5", "eval.num_samples=64",
        "model.ngf=16", "model.ndf=16", "model.nz=16", *extra])


def test_spine_s3_mlflow_ray_registry(s3_shards, mlflow_server, ray_local, tmp_path):
    url, card = s3_shards
    manifest = read_manifest(url)
    assert manifest["samples"].sum() == COUNT == read_card(url).count
    assert len(manifest) == COUNT // 24

    first = run_job(_spec(tmp_path, url, mlflow_server.url, "train.steps=30"), say=print)

    # Both workers trained the same number of steps.
    assert first.metrics["steps_per_rank"] == [30, 30]
    assert first.metrics["images_seen"] == 30 * 16
    # The checkpoints are in the run's storage on S3.
    fs, _ = filesystem("s3://orbitgen")
    ckpts = [p for p in fs.find(first.storage.removeprefix("s3://")) if p.endswith("generator.pt")]
    assert ckpts, f"no checkpoint under {first.storage}"

    client = MlflowClient(mlflow_server.url)
    run = client.get_run(first.run_id)
    assert run.data.tags["orbitgen.family"] == "dcgan"
    assert run.data.tags["orbitgen.data_fingerprint"] == card.fingerprint
    assert run.data.params["fid_extractor"] == "orbitgen-randconv64-v1"
    losses = client.get_metric_history(first.run_id, "loss_D")
    assert [m.step for m in losses] == [5, 10, 15, 20, 25, 30]
    assert all(np.isfinite(m.value) for m in losses)
    artifacts = {a.path for a in client.list_artifacts(first.run_id)}
    assert {"spec.yaml", "samples", "dataset"} <= artifacts
    assert any(a.path.endswith(".png") for a in client.list_artifacts(first.run_id, "samples"))
    assert first.promotion.promoted and first.model_version == "1"

    mlflow.set_tracking_uri(mlflow_server.url)
    champion = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    images = champion.predict(pd.DataFrame({"seed": [0, 1, 0]}))
    assert images.shape == (3, RES, RES, 1) and images.dtype == np.uint8
    assert np.array_equal(images[0], images[2]) and not np.array_equal(images[0], images[1])
    assert images.std() > 1.0      # an image, not a constant

    # A worse run (one step at a negligible learning rate: the generator stays at its init).
    second = run_job(_spec(tmp_path, url, mlflow_server.url, "train.steps=1", "train.lr=1e-12"), say=print)
    assert second.metrics["fid"] > first.metrics["fid"]
    assert not second.promotion.promoted
    model = client.get_registered_model(MODEL)
    assert model.aliases["champion"] == "1" and model.aliases["challenger"] == "2"
