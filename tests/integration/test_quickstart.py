"""`orbitgen quickstart`, the README's first command, at a tiny size: it ends with the trained and
the untrained generator's FID (same evaluation), and a picture of the data set's images beside
the samples, printed and logged into the run."""
from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from PIL import Image

from data_shards.preview import image_grid
from data_shards.stream import iterate_once
from jobs.cli import main
from jobs.runtime.env import tracking_uri_restored
from models.images import nchw_to_nhwc_numpy

pytestmark = pytest.mark.integration
TINY = ["data.train=builtin:craters?count=64&seed=0", "data.resolution=16", "data.shuffle_buffer=16",
        "data.loader_workers=0", "model.nz=8", "model.ngf=8", "model.ndf=8", "train.batch=8", "train.steps=6",
        "checkpoint.every_steps=6", "eval.num_samples=32", "tracking.registry_model=null"]


def actors() -> Counter:
    import ray
    from ray.util.state import list_actors
    return Counter(a.class_name for a in list_actors(address=ray.get_runtime_context().gcs_address, limit=10_000))


def test_quickstart_ends_with_untrained_fid_and_reals_beside_samples(ray_local, tmp_path):
    before = actors()
    with tracking_uri_restored():
        result = CliRunner().invoke(main, ["quickstart", "--workdir", str(tmp_path),
                                           *[a for s in TINY for a in ("--set", s)]], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    trained = float(re.search(r"fid\s+([\d.]+) \(extractor", result.output).group(1))
    untrained, ratio = map(float, re.search(r"untrained\s+fid ([\d.]+).*= ([\d.]+)", result.output).groups())
    assert ratio == pytest.approx(trained / untrained, rel=1e-2)

    picture = re.search(r"samples\s+(\S+\.png)", result.output).group(1)
    image = np.asarray(Image.open(picture))
    url = re.search(r"shards\s+(\S+)", result.output).group(1)
    reals = image_grid(nchw_to_nhwc_numpy(next(iterate_once(url, batch_size=64, limit=64))["image"]))
    assert np.array_equal(image[:, : reals.shape[1]], reals[..., 0])        # the left half: the data set
    assert image.shape[1] > 2 * reals.shape[1]                              # the samples beside it

    run_id = re.search(r"mlflow run\s+(\w+)", result.output).group(1)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(run_id).data.metrics["fid_untrained"] == pytest.approx(untrained, rel=1e-3)
    assert any(a.path.endswith("reals-vs-samples.png") for a in client.list_artifacts(run_id, "samples"))

    # On one node, Ray Train's preemption watcher has nothing to watch: not started (jobs/runtime/ray_session.py).
    after = actors()
    assert after["TrainController"] == before["TrainController"] + 1
    assert after["PreemptionWatcher"] == before["PreemptionWatcher"]
