"""`jobs.eval.core`: each family's metrics on tiny real shards (outputs paired with their own
targets), and the sample-grid preview for unconditional and conditional families."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from data_shards.sources import Sample
from data_shards.writer import write_shards
from family_checks import smooth_batch
from jobs.eval.core import EvalSettings, evaluate, preview
from models.registry import make_family
from models.images import nchw_to_nhwc_numpy, to_uint8
from tiny_specs import tiny_model

RES, N = 16, 10
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """cond, mask, image triples; image = cond flipped left-right, so a perfect model is known."""
    cond = nchw_to_nhwc_numpy(to_uint8(smooth_batch(N, 3, RES, seed=0)))
    mask = nchw_to_nhwc_numpy(to_uint8(smooth_batch(N, 1, RES, seed=1)))
    samples = [Sample(key=f"s{i:03d}", image=cond[i, :, ::-1].copy(), cond=cond[i], mask=mask[i]) for i in range(N)]
    url = str(tmp_path_factory.mktemp("shards") / "triples")
    write_shards(samples, url, layout="test", resolution=RES, channels=3, source="test", shard_samples=4, progress=False)
    return url


class Flip(nn.Module):
    """The perfect translator of the fixture's set (a parameter, so it has a device)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return torch.flip(x[:, :3], dims=[3]) + 0 * self.w


def family(name: str, **cfg):
    return make_family(name, {**tiny_model(name), **cfg}, resolution=RES, channels=3, lr=2e-4)


def run(fam, sampler, url, n=N, batch=4):
    return evaluate(fam, sampler, EvalSettings(num_samples=n, batch=batch), data_url=url, device=CPU)


def test_conditional_outputs_are_paired_with_their_targets(shards):
    fam = family("pix2pix")
    scores, params = run(fam, Flip(), shards)
    assert set(scores) == {"l1", "ssim", "psnr", "fid"}
    assert scores["l1"] == 0 and scores["ssim"] == pytest.approx(1, abs=1e-6) and scores["psnr"] > 80
    assert abs(scores["fid"]) < 1e-3
    assert params["fid_extractor"] == "orbitgen-randconv64-v1" and params["eval_fake_images"] == str(N)
    # An untrained generator scores worse on every count.
    torch.manual_seed(0)
    worse, _ = run(fam, fam.build()["G"], shards)
    assert worse["l1"] > 0.05 and worse["ssim"] < 0.9 and worse["psnr"] < 30 and worse["fid"] > 1


def test_only_the_chosen_metrics_are_computed(shards):
    fam = family("pix2pix")
    scores, params = evaluate(fam, Flip(), EvalSettings(num_samples=N, batch=4, metrics=("ssim", "fid")),
                              data_url=shards, device=CPU)
    assert set(scores) == {"ssim", "fid"} and params["eval_metrics"] == "ssim,fid"
    assert scores["ssim"] == pytest.approx(1, abs=1e-6)


def test_spatiotemporal_metrics_and_limit(shards):
    fam = family("cgan_unet")
    scores, params = run(fam, Flip(), shards, n=6)
    # the family asks for `lpips`; without LPIPS weights it is computed and logged as what it is
    assert set(scores) == {"perceptual_randconv", "ssim", "psnr", "fid", "f1"}
    assert scores["f1"] == pytest.approx(1.0) and scores["perceptual_randconv"] == pytest.approx(0, abs=1e-6)
    assert params["eval_real_images"] == "6" and "randconv" in params["perceptual_randconv_network"]
    assert "asked for as lpips" in params["perceptual_randconv_note"] and "lpips_network" not in params
    torch.manual_seed(0)
    untrained, _ = run(fam, fam.build()["G"], shards, n=6)
    assert untrained["f1"] < 1 and untrained["perceptual_randconv"] > 0


def test_unconditional_fid_uses_num_samples_fakes(shards):
    fam = family("dcgan")
    torch.manual_seed(0)
    scores, params = run(fam, fam.build()["G"], shards, n=12, batch=5)
    assert set(scores) == {"fid"} and scores["fid"] > 0
    assert params["fid_num_samples"] == "12" and params["eval_real_images"] == str(N)   # the set has only N


def test_preview(shards):
    fam = family("cgan_unet")
    strips = preview(fam, Flip(), data_url=shards, n=3, seed=0, device=CPU)
    # past | mask | output | target, side by side; the perfect output equals the target.
    assert strips.shape == (3, RES, 4 * RES, 3) and strips.dtype == np.uint8
    assert np.array_equal(strips[:, :, 2 * RES:3 * RES], strips[:, :, 3 * RES:])
    assert np.array_equal(strips[..., RES:2 * RES, 0], strips[..., RES:2 * RES, 2])   # the grey mask
    dc = family("dcgan")
    grid = preview(dc, dc.build()["G"], data_url=shards, n=5, seed=1, device=CPU)
    assert grid.shape == (5, RES, RES, 3)
