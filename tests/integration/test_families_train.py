"""Every ready spec of the model families trains 2 steps through `orbitgen train` on 2 CPU
workers (local Ray, built-in data at 16x16, tiny widths), logs its family's metrics, and
registers a model that samples through `mlflow.pyfunc`; sat2ground's stage 2 freezes the model
stage 1 registered."""
from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from family_checks import smooth_batch
from jobs.cli import main
from jobs.spec import SPECS_DIR, load_spec
from models.images import nchw_to_nhwc_numpy, to_uint8
from models.metrics.suite import named_for_weights
from models.png import encode_png
from tiny_specs import tiny_sets

pytestmark = pytest.mark.integration
RES = 16


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One workdir and one sqlite tracking store (and registry) for all the runs."""
    work = tmp_path_factory.mktemp("families")
    return work, f"sqlite:///{work / 'mlflow.db'}"


def overrides(spec: str, store) -> list[str]:
    """The spec at its family's tiny size (16x16, built-in data, 2 steps of 4 images) on 2 workers."""
    work, uri = store
    return tiny_sets(spec, f"workdir={work}", f"tracking.uri={uri}", "data.shuffle_buffer=8", "train.log_every=1",
                     "checkpoint.every_steps=2", "scaling.num_workers=2")


def train(spec: str, store, *extra: str):
    """`orbitgen train` in this process (the session's Ray); the registered model's version and run."""
    sets = overrides(spec, store) + list(extra)
    result = CliRunner().invoke(main, ["train", str(SPECS_DIR / f"{spec}.yaml"), *[a for s in sets for a in ("--set", s)]])
    assert result.exit_code == 0, result.output + repr(result.exception)
    parsed = load_spec(SPECS_DIR / f"{spec}.yaml", sets)
    client = MlflowClient(store[1])
    versions = client.search_model_versions(f"name='{parsed.tracking.registry_model}'")
    assert [str(v.version) for v in versions] == ["1"]
    return parsed, client.get_run(versions[0].run_id)


def sample_registered(parsed, store, rows: int = 3) -> np.ndarray:
    mlflow.set_tracking_uri(store[1])
    model = mlflow.pyfunc.load_model(f"models:/{parsed.tracking.registry_model}/1")
    fam = parsed.make_family()
    if not fam.conditional:
        return model.predict(pd.DataFrame({"seed": list(range(rows))}))
    images = nchw_to_nhwc_numpy(to_uint8(smooth_batch(rows, parsed.data.channels, RES, seed=0)))
    frame = pd.DataFrame({"cond": [encode_png(a) for a in images]})
    if "mask" in fam.data_keys:
        masks = nchw_to_nhwc_numpy(to_uint8(torch.sign(smooth_batch(rows, 1, RES, seed=1))))
        frame["mask"] = [encode_png(a) for a in masks]
    return model.predict(frame)


def check(parsed, run, store) -> None:
    fam = parsed.make_family()
    assert parsed.data.resolution == RES
    logged = named_for_weights(fam.metrics, parsed.eval.lpips_weights)   # lpips without weights: perceptual_randconv
    assert set(logged) <= set(run.data.metrics), f"missing metrics: {set(logged) - set(run.data.metrics)}"
    assert all(np.isfinite(run.data.metrics[m]) for m in logged)
    assert run.data.tags["orbitgen.family"] == parsed.family
    out = sample_registered(parsed, store)
    assert out.shape == (3, RES, RES, parsed.data.channels) and out.dtype == np.uint8
    assert out.std() > 0


@pytest.mark.parametrize("spec", ["dcgan_rsicb", "pix2pix_maps", "spatiotemporal_cgan", "spatiotemporal_attention_cgan"])
def test_spec_trains_registers_and_samples(spec, ray_local, store):
    parsed, run = train(spec, store)
    check(parsed, run, store)


def test_sat2ground_two_stages(ray_local, store):
    stage1, run1 = train("sat2ground_stage1", store)
    check(stage1, run1, store)
    # Stage 2 freezes stage 1's champion, found through the registry of the same store.
    stage2, run2 = train("sat2ground_stage2", store, "model.generator_from=models:/sat2ground-stage1@champion")
    check(stage2, run2, store)
    assert {"loss_E", "E_mse", "E_ssim", "E_perceptual"} <= set(run2.data.metrics)
    # The registered stage-2 model holds the stage-1 generator's weights, unchanged by training.
    mlflow.set_tracking_uri(store[1])
    g1 = mlflow.pyfunc.load_model("models:/sat2ground-stage1/1").unwrap_python_model().sampler
    g2 = mlflow.pyfunc.load_model("models:/sat2ground-stage2/1").unwrap_python_model().sampler.generator
    assert all(torch.equal(v, g2.state_dict()[k]) for k, v in g1.state_dict().items())
