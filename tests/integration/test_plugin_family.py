"""A sixth system from outside the repository, touching no file of it: a lab's package with one
`Family` subclass and a spec that names it (`family: toypkg.toy:ToyGAN`), trained by the real
`orbitgen train` in a subprocess (its own local Ray, 2 CPU workers, a local sqlite MLflow store);
the run finishes, logs its losses and FID, registers a model, and the model samples through
`mlflow.pyfunc`. The other route, the `orbitgen.families` entry-point group of an installed
package, is checked on discovery and spec validation."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
ORBITGEN = REPO / ".venv" / "bin" / "orbitgen"

TOY = '''
"""A toy GAN: one linear layer each way. Everything a family needs, nothing else."""
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from models.family import Family, FamilyConfig, Phase, run_in_eval


class ToyConfig(FamilyConfig):
    nz: int = Field(8, ge=1)
    width: int = Field(32, ge=1)


class ToyGAN(Family):
    name = "toy"
    config_cls = ToyConfig
    metrics = ("fid",)
    tiny = {"data.resolution": 16, "model.nz": 4, "model.width": 8}

    def build(self):
        c, r, cfg = self.channels, self.resolution, self.config
        g = nn.Sequential(nn.Linear(cfg.nz, c * r * r), nn.Tanh(), nn.Unflatten(1, (c, r, r)))
        d = nn.Sequential(nn.Flatten(), nn.Linear(c * r * r, cfg.width), nn.LeakyReLU(0.2), nn.Linear(cfg.width, 1))
        return {"G": g, "D": d}

    def phases(self):
        return [Phase("D", self.lr, (0.5, 0.999)), Phase("G", self.lr, (0.5, 0.999))]

    def loss(self, batch, ctx):
        real = batch["image"]
        z = torch.randn(real.shape[0], self.config.nz, device=ctx.device, generator=ctx.generator)
        if ctx.phase == "D":
            with torch.no_grad():
                fake = ctx.net("G")(z)
            d = ctx.net("D")
            loss = F.softplus(-d(real)).mean() + F.softplus(d(fake)).mean()
            return loss, {"loss_D": loss.detach()}
        loss = F.softplus(-ctx.net("D")(ctx.net("G")(z))).mean()
        return loss, {"loss_G": loss.detach()}

    @torch.no_grad()
    def sample(self, sampler, n, *, seed=0, cond=None, mask=None):
        z = torch.randn(n, self.config.nz, generator=torch.Generator().manual_seed(seed))
        return run_in_eval(sampler, z)
'''

SPEC = """\
name: toy-gan
family: toypkg.toy:ToyGAN
data: {train: "builtin:craters?count=16&seed=0", resolution: 16, channels: 1, shuffle_buffer: 8, loader_workers: 0}
model: {nz: 4, width: 8}
train: {batch: 4, steps: 3, lr: 0.001, log_every: 1}
strategy: {kind: ddp}
scaling: {num_workers: 2, use_gpu: false}
checkpoint: {every_steps: 3, keep: 1}
eval: {metrics: [fid], num_samples: 8, fid_extractor: randconv}
tracking: {registry_model: toy-gan}
"""


def write_plugin(root: Path) -> Path:
    """The lab's package, outside the repository: toypkg/toy.py and its spec."""
    (root / "toypkg").mkdir(parents=True)
    (root / "toypkg" / "__init__.py").write_text("")
    (root / "toypkg" / "toy.py").write_text(textwrap.dedent(TOY))
    (root / "toy.yaml").write_text(SPEC)
    return root


def env_with(*paths: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), *filter(None, [env.get("PYTHONPATH")])])
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    return env


def test_a_family_outside_the_repository_trains_through_orbitgen_train(tmp_path):
    plugin = write_plugin(tmp_path / "plugin")
    work = tmp_path / "work"
    uri = f"sqlite:///{work / 'mlflow.db'}"
    cmd = [str(ORBITGEN), "train", str(plugin / "toy.yaml"), "--set", f"workdir={work}", "--set", f"tracking.uri={uri}"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env_with(plugin), capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert "models:/toy-gan/1" in done.stdout, done.stdout[-3000:]

    client = MlflowClient(uri)
    (version,) = client.search_model_versions("name='toy-gan'")
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["orbitgen.family"] == "toypkg.toy:ToyGAN"
    assert {"loss_D", "loss_G", "fid"} <= set(run.data.metrics) and np.isfinite(run.data.metrics["fid"])
    assert [m.step for m in sorted(client.get_metric_history(run.info.run_id, "loss_D"), key=lambda m: m.step)] == [1, 2, 3]

    # The registered model carries the lab's package: it loads where that package is not importable.
    import sys
    assert "toypkg" not in sys.modules and not any(str(plugin) == p for p in sys.path)
    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pyfunc.load_model("models:/toy-gan/1")
        images = model.predict(pd.DataFrame({"seed": [0, 1, 0]}))
    finally:
        mlflow.set_tracking_uri(None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    assert images.shape == (3, 16, 16, 1) and images.dtype == np.uint8
    assert np.array_equal(images[0], images[2]) and not np.array_equal(images[0], images[1]) and images.std() > 0


def test_an_installed_package_brings_its_family_by_entry_point(tmp_path):
    """An installed distribution's `orbitgen.families` entry point (a dist-info on the path stands
    in for `pip install`): the family is discovered by name and a spec may say `family: toy`."""
    plugin = write_plugin(tmp_path / "plugin")
    dist = plugin / "toypkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toypkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[orbitgen.families]\ntoy = toypkg.toy:ToyGAN\n")
    check = textwrap.dedent(f"""
        from jobs.spec import load_spec
        from models.registry import available_families, family_ref, get_family_cls
        assert "toy" in available_families(), available_families()
        spec = load_spec({str(plugin / "toy.yaml")!r}, ["family=toy"])
        family = spec.make_family()
        assert type(family) is get_family_cls("toy") and type(family).__module__ == "toypkg.toy"
        assert family_ref(type(family)) == "toy"
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", check], cwd=REPO, env=env_with(plugin, REPO), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr
