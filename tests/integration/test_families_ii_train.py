"""The SCB-GAN and diffusion specs train through `orbitgen train` on 2 CPU workers (local Ray,
tiny widths, 16x16): SCB-GAN from a StyleGAN dataset zip built into shards, with ADA, MineAug
and the vision-aided stages on small random backbones; the three diffusion specs, the
ControlNet on the unconditional model registered just before. Each logs its family's metrics
and registers a model that samples through `mlflow.pyfunc`."""
from __future__ import annotations

import io
import json
import zipfile

import mlflow
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from PIL import Image

from data_shards.synthetic import crater_field
from jobs.cli import main
from jobs.spec import SPECS_DIR, load_spec
from models.nets.vision_backbones import save_random_backbone
from test_families_train import check, sample_registered
from tiny_specs import tiny_sets

pytestmark = pytest.mark.integration
RES = 16


def scbgan_tiny(spec: str, *extra: str) -> list[str]:
    """The SCB-GAN spec at stylegan2's tiny size on the probe shards, the vision-aided heads as the spec has them
    (the tiny size switches them off: they need backbone files)."""
    return [s for s in tiny_sets(spec, *extra) if not s.startswith("model.vision_aided=")]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    work = tmp_path_factory.mktemp("families_ii")
    return work, f"sqlite:///{work / 'mlflow.db'}"


@pytest.fixture(scope="module")
def probe_shards(store):
    """A StyleGAN dataset zip of 24 grey crater images, built into shards as a user would."""
    work = store[0]
    with zipfile.ZipFile(work / "probe.zip", "w") as z:
        for i, sample in enumerate(crater_field(24, 32, channels=1, seed=3)):
            buf = io.BytesIO()
            Image.fromarray(sample.image[..., 0], "L").save(buf, format="PNG")
            z.writestr(f"00000/img{i:08d}.png", buf.getvalue())
        z.writestr("dataset.json", json.dumps({"labels": None}))
    out = work / "shards" / "probe"
    result = CliRunner().invoke(main, ["data", "build", str(work / "probe.zip"), out.as_uri(), "--layout", "stylegan-zip",
                                       "--resolution", str(RES), "--channels", "gray"])
    assert result.exit_code == 0, result.output
    return out.as_uri()


def train(spec: str, store, sets: list[str]):
    work, uri = store
    sets = [f"workdir={work}", f"tracking.uri={uri}", "train.log_every=1", "data.shuffle_buffer=8",
            "checkpoint.every_steps=100", "scaling.num_workers=2", *sets]
    result = CliRunner().invoke(main, ["train", str(SPECS_DIR / f"{spec}.yaml"), *[a for s in sets for a in ("--set", s)]])
    assert result.exit_code == 0, result.output + repr(result.exception)
    parsed = load_spec(SPECS_DIR / f"{spec}.yaml", sets)
    client = MlflowClient(uri)
    (version,) = client.search_model_versions(f"name='{parsed.tracking.registry_model}'")
    return parsed, client.get_run(version.run_id), client


def history(client, run, key) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


def test_scbgan_rosetta_with_vision_aided_stages(ray_local, store, probe_shards):
    weights = {k: save_random_backbone(k, store[0] / "backbones" / f"{k}.pt", size="tiny", seed=i)
               for i, k in enumerate(["clip_vitb32", "dino_vitb16", "swin_t", "vgg16"])}
    sets = scbgan_tiny("scbgan_rosetta", f"data.train={probe_shards}", "train.steps=5",
                       "model.vision_aided.size=tiny", "model.vision_aided.warmup_kimg=0.008",
                       "model.vision_aided.kimg_stages=[0.004,0.004,0.004]", "model.vision_aided.probe_images=8",
                       "augment.ada.interval=1", "model.r1_every=2", "model.pl_every=2",
                       *[f"model.vision_aided.weights.{k}={p}" for k, p in weights.items()])
    parsed, run, client = train("scbgan_rosetta", store, sets)
    metrics = run.data.metrics
    assert {"fid", "kid", "precision", "recall"} <= set(metrics)
    assert all(np.isfinite(metrics[k]) for k in ("fid", "kid", "precision", "recall"))
    # One backbone added after each of steps 2, 3, 4 (4 images a step), chosen by the probe.
    assert history(client, run, "vision_stage") == [0, 1, 2, 3, 3]
    assert len([k for k in metrics if k.startswith("probe_acc_")]) == 4
    assert {"loss_D_vision", "loss_G_vision", "r1", "pl_penalty"} <= set(metrics)
    assert len(history(client, run, "ada_p")) == 5 and any(k.startswith("ada_p_") for k in metrics)
    assert parsed.augment.mineaug == ["HorizontalFlip", "RandomAffine", "Rotate"]
    out = sample_registered(parsed, store)
    assert out.shape == (3, RES, RES, 1) and out.dtype == np.uint8 and out.std() > 0


def test_scbgan_dawn_plain_stylegan2_ada_under_deepspeed(ray_local, store, probe_shards):
    sets = tiny_sets("scbgan_dawn", f"data.train={probe_shards}", "strategy.kind=deepspeed", "strategy.zero_stage=1",
                     "augment.ada.interval=2")   # tiny: no vision-aided heads
    parsed, run, client = train("scbgan_dawn", store, sets)
    assert {"fid", "kid", "precision", "recall", "ada_p", "loss_D", "loss_G"} <= set(run.data.metrics)
    assert "vision_stage" not in run.data.metrics
    out = sample_registered(parsed, store)
    assert out.shape == (3, RES, RES, 1)


def test_diffusion_specs_and_a_controlnet_on_the_registered_base(ray_local, store):
    for spec in ("diffusion_uncond", "spatiotemporal_diffusion"):
        parsed, run, _ = train(spec, store, tiny_sets(spec))
        check(parsed, run, store)
        assert "loss_eps" in run.data.metrics
    # The ControlNet freezes the champion that diffusion_uncond registered in this store.
    parsed, run, _ = train("spatiotemporal_controlnet", store, tiny_sets("spatiotemporal_controlnet"))
    check(parsed, run, store)
    mlflow.set_tracking_uri(store[1])
    base = mlflow.pyfunc.load_model("models:/diffusion-uncond/1").unwrap_python_model().sampler
    controlled = mlflow.pyfunc.load_model("models:/spatiotemporal-controlnet/1").unwrap_python_model().sampler
    assert all(torch.equal(v, controlled.base.state_dict()[k]) for k, v in base.state_dict().items())
