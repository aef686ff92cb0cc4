"""No credential at rest in what a search writes: after a real search on S3 (stage 1 and stage 2 on
Ray Tune), no object under its folder (results, shards, Tune's tuner.pkl and experiment state) and
no local file of its tracking store holds the AWS key id or secret, as bytes, hex or base64."""
import base64
import pickle
import sys
import uuid

import numpy as np
import pytest
import ray.cloudpickle
import torch

from data_shards.environ import environ_set
from data_shards.storage import filesystem
from search.run import run_search
from search.store import SearchStore

import secret_scan

pytestmark = pytest.mark.integration
# The fake train_fn below travels to Tune's workers by value (this module is not importable there).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

# Distinct from every name and path the search writes (the fixture's key id is the bucket's name).
KEY, SECRET = "AKIAORBITGENSECRETS7Q", "zQ9x-search-secret-never-at-rest-4tW"


def leaks(blob: bytes) -> list[str]:
    return secret_scan.leaks(blob, {"key id": KEY, "secret": SECRET})


def fake_train(augmentations, budget_steps, report, trial_dir):
    for step in range(1, budget_steps + 1):
        report(step, 50.0 / step + len(augmentations))
    g = torch.Generator().manual_seed(len(augmentations))
    return {"fid": 50.0 / budget_steps + len(augmentations),
            "samples": torch.randint(0, 256, (32, 1, 32, 32), dtype=torch.uint8, generator=g)}


@pytest.fixture
def credentials(s3_server):
    with environ_set({"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET}):
        yield


def test_the_detector_finds_a_pickled_credential(credentials):
    fs, _ = filesystem("s3://orbitgen/x")   # the data plane's filesystem carries them, in memory
    assert leaks(pickle.dumps(fs)) == ["key id", "secret"]
    assert leaks(base64.b64encode(b"xy" + pickle.dumps(fs))) == ["key id", "secret"]
    assert leaks(pickle.dumps(fs).hex().encode()) == ["key id", "secret"]


def test_the_store_and_tune_s_filesystem_pickle_without_credentials(credentials):
    store = SearchStore("s3://orbitgen/searches/pickle")
    _, tune_fs = store.tune_storage()
    assert leaks(pickle.dumps(store)) == [] and leaks(ray.cloudpickle.dumps(tune_fs)) == []


def test_a_search_on_s3_leaves_no_credential_at_rest(ray_local, credentials, tmp_path):
    prefix = f"orbitgen/searches/secrets-{uuid.uuid4().hex[:8]}"
    cfg = {"k": 2, "candidates": ["HorizontalFlip", "VerticalFlip", "Invert"], "repeats": 1, "max_images": 64,
           "concurrency": 2, "validate": {"top_m": 2, "trials": 2, "budget_steps": 2, "seeds": 1}}
    result = run_search("builtin:craters?count=64&seed=0", channels=1, resolution=32, config=cfg,
                        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="secrets", name="secrets",
                        storage=f"s3://{prefix}", train_fn=fake_train, progress=None)
    assert result.validation is not None

    fs, _ = filesystem(f"s3://{prefix}")
    objects = fs.find(prefix)
    assert any(p.endswith("/tuner.pkl") for p in objects) and any("experiment_state" in p for p in objects)
    assert any("/stage1/" in p for p in objects) and any("/stage2/" in p for p in objects)
    found = {p: leaks(fs.cat_file(p)) for p in objects}
    found |= {str(p): leaks(p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()}
    assert {p: what for p, what in found.items() if what} == {}
    assert np.isfinite(result.ranking[0].fid)
