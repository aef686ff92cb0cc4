"""The ready specs of the reproduced systems validate and carry the published defaults; specs
that build on another spec's model fit it. (That every family × ready spec builds, trains and
samples at its tiny size: test_family_contract.py.)"""
from __future__ import annotations

import pytest

from jobs.spec import SPECS_DIR, load_spec
from tiny_specs import ready_specs

SPECS = [name for name in ready_specs() if name != "quickstart"]   # quickstart: the embedded default, not a paper
# DDPM's CIFAR-10 UNet and process, as every diffusion spec has them.
DDPM = {"base_channels": 128, "channel_mult": [1, 2, 2, 2], "num_res_blocks": 2, "attention_resolutions": [16],
        "dropout": 0.1, "timesteps": 1000, "schedule": "cosine", "sample_steps": 50, "ema_decay": 0.9999,
        "beta1": 0.9, "beta2": 0.999}
DIFFUSION_LAYOUT = ("base_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "timesteps", "schedule")


@pytest.mark.parametrize("name", SPECS)
def test_spec_validates_with_published_defaults(name):
    spec = load_spec(SPECS_DIR / f"{name}.yaml")
    fam = spec.make_family()
    assert spec.eval.metrics == list(fam.metrics)                    # what the family is judged by
    assert spec.tracking.registry_model == spec.name
    if spec.family == "stylegan2":   # MINEAUG.md §4 paper256_2fmap, §2 stages, §1 the published choices
        m = spec.model
        assert (m["z_dim"], m["w_dim"], m["mapping_layers"], m["channel_base"], m["channel_max"], m["mbstd_group"]) \
            == (512, 512, 8, 32768, 512, 4)
        assert (spec.train.lr, m["r1_gamma"], m["ema_kimg"], m["style_mixing"], m["pl_weight"]) == (0.002, 1, 10, 0.9, 2)
        assert (m["pl_every"], m["r1_every"], spec.train.batch, spec.scaling.num_workers) == (4, 16, 16, 4)
        assert (spec.data.resolution, spec.data.channels, spec.augment.ada["target"]) == (256, 1, 0.6)
        va = m["vision_aided"]
        assert va["kimg_stages"] == [4000, 2000, 2000] and va["warmup_kimg"] + sum(va["kimg_stages"]) == spec.train.kimg
        assert spec.augment.mineaug == {"scbgan_rosetta": ["HorizontalFlip", "RandomAffine", "Rotate"],
                                        "scbgan_dawn": ["HorizontalFlip", "Translation_y", "Zoom_in"]}[name]
        return
    if spec.family == "diffusion":
        assert {k: spec.model[k] for k in DDPM} == DDPM and (spec.data.resolution, spec.train.batch) == (64, 128)
        # DDPM's Adam 2e-4; a ControlNet fine-tunes at ControlNet's 1e-5.
        assert spec.train.lr == (1e-5 if spec.model["conditioning"] == "controlnet" else 2e-4)
        return
    assert spec.train.lr == 2e-4 and spec.model["beta1"] == 0.5     # the GANs: Adam 2e-4, β1 0.5
    if spec.family in ("pix2pix", "cgan_unet", "cgan_attention_unet"):
        assert (spec.data.resolution, fam.depth, spec.model["d_layers"], spec.model["l1_weight"]) == (256, 8, 3, 100)
        assert spec.per_worker_batch == 1                              # pix2pix's batch of one per device
    else:
        assert (spec.data.resolution, spec.model["nz"], spec.model["ngf"]) == (128, 100, 64)
        if spec.family == "dcgan":
            assert spec.model["r1_gamma"] == 0                         # DCGAN has no R1 (the quickstart's does)


def test_sat2ground_stages_fit_together():
    one, two = (load_spec(SPECS_DIR / f"sat2ground_stage{i}.yaml") for i in (1, 2))
    assert one.model["stage"] == 1 and two.model["stage"] == 2
    assert two.model["generator_from"] == f"models:/{one.tracking.registry_model}@champion"
    assert all(one.model[k] == two.model[k] for k in ("nz", "ngf", "max_channels"))
    assert (one.data.resolution, one.data.channels) == (two.data.resolution, two.data.channels)


def test_controlnet_fits_its_base():
    base, cn = (load_spec(SPECS_DIR / f"{n}.yaml") for n in ("diffusion_uncond", "spatiotemporal_controlnet"))
    assert base.model["conditioning"] == "none" and cn.model["conditioning"] == "controlnet"
    assert cn.model["base_from"] == f"models:/{base.tracking.registry_model}@champion"
    assert all(base.model[k] == cn.model[k] for k in DIFFUSION_LAYOUT)
    assert (base.data.train, base.data.resolution, base.data.channels) == (cn.data.train, cn.data.resolution,
                                                                           cn.data.channels)
