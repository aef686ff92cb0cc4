"""`orbitgen search mineaug` as a user runs it, on the real servers: shards on the S3 server,
the search's trial results on S3, tracking on the MLflow server, trials on a local Ray; then
`orbitgen train` of the spec it wrote, and `orbitgen search show`."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from data_shards.storage import filesystem
from data_shards.synthetic import crater_field
from data_shards.writer import write_shards
from jobs.cli import main
from jobs.spec import SPECS_DIR

RES, COUNT = 16, 64
QUICKSTART = str(SPECS_DIR / "quickstart.yaml")
CANDIDATES = "[HorizontalFlip,VerticalFlip,Rotate,RandomAffine,Invert,Shear]"


@pytest.fixture(scope="module")
def shards(s3_server):
    url = "s3://orbitgen/shards/search-craters16"
    write_shards(crater_field(COUNT, RES, channels=1, seed=5), url, layout="synthetic:craters", resolution=RES,
                 channels=1, source="test", shard_samples=32, progress=False)
    return url


def small(workdir: Path, shards_url: str, tracking_uri: str, *extra: str) -> list[str]:
    sets = [f"workdir={workdir}", f"data.train={shards_url}", f"data.resolution={RES}", "data.shuffle_buffer=16",
            f"tracking.uri={tracking_uri}", "tracking.registry_model=search-test", "checkpoint.storage=s3://orbitgen/runs",
            "model.nz=16", "model.ngf=8", "model.ndf=8", "train.batch=8", "eval.num_samples=32",
            f"search.candidates={CANDIDATES}", "search.k=2", "search.repeats=2",
            "search.mse_min=0.005",   # rotations by <= 15° move few pixels of a 16² image
            *extra]
    return [arg for s in sets for arg in ("--set", s)]


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_search_writes_a_spec_that_trains(shards, mlflow_server, ray_local, tmp_path):
    res = invoke("search", "mineaug", QUICKSTART, *small(tmp_path, shards, mlflow_server.url))
    assert res.exit_code == 0, res.output + res.stderr
    out = res.output
    n = len(CANDIDATES.strip("[]").split(","))
    assert f"[{n}/{n}]" in res.stderr, "the trial lines count the finished trials"
    assert "Rotate" in out and "RandomAffine" in out and "near-duplicate of" in out
    assert "Shear" in out and "near-identity" in out
    parent = re.search(r"parent run ([0-9a-f]{32})", out).group(1)
    written = Path(re.search(r"next\s+orbitgen train (\S+)", out).group(1))
    doc = yaml.safe_load(written.read_text())
    chosen = doc["augment"]["mineaug"]
    assert len(chosen) == 2 and doc["augment"]["search_run"] == parent
    assert not {"Rotate", "RandomAffine"} <= set(chosen), "two near-duplicates chosen together"
    assert "Shear" not in chosen and "Invert" not in chosen

    client = MlflowClient(mlflow_server.url)
    run = client.get_run(parent)
    assert run.info.status == "FINISHED"
    assert run.data.tags["orbitgen.search.chosen"].split(",") == chosen
    children = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(c.data.params["candidate"] for c in children) == sorted(CANDIDATES.strip("[]").split(","))
    assert {"ranking.csv", "subsets.csv"} <= {a.path for a in client.list_artifacts(parent)}
    # Trial results live on the S3 server, where a cluster's trials can all reach them.
    fs, _ = filesystem("s3://orbitgen")
    assert fs.glob("orbitgen/runs/search/*/stage1/HorizontalFlip.json")

    shown = invoke("search", "show", parent, "--tracking-uri", mlflow_server.url)
    assert shown.exit_code == 0 and "HorizontalFlip" in shown.output and ", ".join(chosen) in shown.output

    trained = invoke("train", str(written), "--set", "train.steps=4", "--set", "checkpoint.every_steps=4")
    assert trained.exit_code == 0, trained.output + trained.stderr
    run_id = re.search(r"mlflow run\s+([0-9a-f]{32})", trained.output).group(1)
    train_run = client.get_run(run_id)
    assert train_run.data.tags["orbitgen.search_run"] == parent
    assert train_run.data.params["augment.mineaug"] == str(chosen)


def test_stage2_validates_subsets_by_training(shards, mlflow_server, ray_local, tmp_path):
    res = invoke("search", "mineaug", QUICKSTART, *small(
        tmp_path, shards, mlflow_server.url, "search.validate.top_m=3", "search.validate.trials=3",
        "search.validate.budget_steps=4", "search.validate.seeds=1", "search.concurrency=2"))
    assert res.exit_code == 0, res.output + res.stderr
    assert "stage 2" in res.output
    parent = re.search(r"parent run ([0-9a-f]{32})", res.output).group(1)
    client = MlflowClient(mlflow_server.url)
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent}'")
    validated = [c for c in children if c.data.params.get("augmentations") is not None]
    assert len(validated) >= 3
    # Each proxy was scored against the originals during its training (what ASHA decides on).
    assert all(client.get_metric_history(c.info.run_id, "fid_step") for c in validated
               if c.data.tags.get("orbitgen.search.status") == "finished")
