"""The pix2pix family and its networks: UNet (with and without attention gates), PatchGAN, the
conditional objective, sampling and a short overfit."""
from __future__ import annotations

import pydantic
import pytest
import torch
from torch import nn

from family_checks import Recording, ctx_for, mean, paired_batch, param_count, train
from models.registry import available_families, get_family_cls, make_family
from models.nets.patchgan import patch_grid, receptive_field
from models.families.pix2pix import Pix2Pix, Pix2PixConfig
from models.nets.pix2pix_unet import AttentionGate, Pix2PixUNet as UNet


def tiny(resolution: int = 16, channels: int = 3, lr: float = 1e-3, **cfg) -> Pix2Pix:
    return make_family("pix2pix", {"ngf": 16, "ndf": 16, "d_layers": 2, **cfg}, resolution=resolution,
                       channels=channels, lr=lr)


def test_registered():
    assert "pix2pix" in available_families()
    cls = get_family_cls("pix2pix")
    assert cls is Pix2Pix and cls.conditional and cls.data_keys == ("cond", "image")
    assert cls.metrics == ("l1", "ssim", "psnr", "fid") and cls.sampler_role == "G"


def test_published_networks_at_256():
    """UNet-256 and the 70x70 PatchGAN with pix2pix's defaults: its parameter counts."""
    fam = make_family("pix2pix", resolution=256, channels=3, lr=2e-4)
    assert fam.depth == 8 and fam.config.l1_weight == 100 and fam.config.beta1 == 0.5
    nets = fam.build()
    assert param_count(nets["G"]) == 54_413_955      # pix2pix prints "54.414 M"
    assert param_count(nets["D"]) == 2_768_705       # and "2.769 M"
    assert receptive_field(3) == 70 and patch_grid(256, 3) == 30
    # Dropout in the three full-width middle decoder blocks only.
    assert sum(isinstance(m, nn.Dropout) for m in nets["G"].modules()) == 3
    assert sum(isinstance(m, AttentionGate) for m in nets["G"].modules()) == 0


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("resolution,d_layers", [(16, 2), (32, 3)])
def test_shapes_and_range(resolution, d_layers, channels):
    fam = tiny(resolution, channels, d_layers=d_layers)
    nets = fam.build()
    batch = paired_batch(fam, n=3)
    out = nets["G"](batch["cond"])
    assert out.shape == (3, channels, resolution, resolution)
    assert out.min() >= -1 and out.max() <= 1 and out.std() > 0
    side = patch_grid(resolution, d_layers)
    assert nets["D"](torch.cat([batch["cond"], out], 1)).shape == (3, 1, side, side)


def test_unet_depth_and_bottleneck():
    u = UNet(3, 1, depth=4, ngf=8)
    assert u(torch.randn(2, 3, 16, 16)).shape == (2, 1, 16, 16)          # 1x1 bottleneck
    assert UNet(3, 1, depth=3, ngf=8)(torch.randn(2, 3, 16, 16)).shape == (2, 1, 16, 16)   # 2x2
    with pytest.raises(ValueError, match="divisible by 16"):
        u(torch.randn(2, 3, 24, 24))


def test_attention_gates_weight_the_skips():
    torch.manual_seed(0)
    u = UNet(3, 3, depth=4, ngf=8, attention=True)
    gates = [m for m in u.modules() if isinstance(m, AttentionGate)]
    assert len(gates) == 3   # one per skip connection
    seen = []
    for g in gates:   # each gate scales its skip by a weight in (0, 1): smaller, same sign
        g.register_forward_hook(lambda m, args, out: seen.append(
            bool((out.abs() <= args[0].abs()).all() and (out * args[0] >= 0).all() and (out != args[0]).any())))
    u.eval()(torch.randn(2, 3, 16, 16))
    assert seen == [True, True, True]
    # Gate with a very negative bias: the skips are (nearly) shut and the output changes.
    x = torch.randn(2, 3, 16, 16)
    before = u(x)
    for g in gates:
        nn.init.constant_(g.psi.bias, -30.0)
    assert not torch.allclose(before, u(x), atol=1e-4)
    assert param_count(u) > param_count(UNet(3, 3, depth=4, ngf=8))


@pytest.mark.parametrize("resolution,field", [(24, "data.resolution"), (48, "data.resolution")])
def test_bad_resolution_names_the_field(resolution, field):
    with pytest.raises(ValueError, match=field):
        tiny(resolution)


def test_explicit_depth_allows_other_sizes_and_checks_patchgan():
    fam = tiny(48, depth=3, d_layers=2)    # 48 = 6 * 2**3
    assert fam.build()["G"](torch.randn(1, 3, 48, 48)).shape == (1, 3, 48, 48)
    with pytest.raises(ValueError, match=r"model\.d_layers"):
        tiny(16, d_layers=3)


def test_config_validation():
    with pytest.raises(pydantic.ValidationError):
        Pix2PixConfig(l1_weight=-1)
    with pytest.raises(pydantic.ValidationError):
        Pix2PixConfig(lambda_l1=10)   # unknown keys are refused
    g, d = tiny(lr=2e-4, lr_g=1e-3).phases()   # G first: its fakes serve the D phase
    assert (d.name, d.lr, d.betas) == ("D", 2e-4, (0.5, 0.999)) and (g.name, g.lr) == ("G", 1e-3)


def test_loss_pairs_and_wrappers():
    fam = tiny()
    nets = fam.build()
    batch = paired_batch(fam, n=4)
    wrapped_d, wrapped_g = Recording(nets["D"]), Recording(nets["G"])
    trained = {"D": wrapped_d, "G": wrapped_g}
    loss, logs = fam.loss(batch, ctx_for(nets, "G", trained=trained))
    assert wrapped_g.calls == [(4, 3)] and wrapped_d.calls == []   # phase G calls the bare D
    assert set(logs) == {"loss_G", "G_adv", "G_L1"}
    assert logs["loss_G"] == pytest.approx(float(logs["G_adv"] + 100 * logs["G_L1"]), rel=1e-5)

    loss, logs = fam.loss(batch, ctx_for(nets, "D", trained=trained))
    # D sees (input, output) pairs, 3 + 3 channels, real and fake in separate calls; no second G forward.
    assert wrapped_d.calls == [(4, 6), (4, 6)] and len(wrapped_g.calls) == 1
    assert set(logs) == {"loss_D", "D_real", "D_fake"} and loss.ndim == 0
    assert all(not v.requires_grad for v in logs.values())
    with pytest.raises(ValueError, match="phase"):
        fam.loss(batch, ctx_for(nets, "E"))


def test_sample_is_deterministic_and_needs_cond():
    fam = tiny()
    G = fam.build()["G"]
    G.train()
    cond = paired_batch(fam)["cond"]
    a, b = fam.sample(G, 4, seed=0, cond=cond), fam.sample(G, 4, seed=9, cond=cond)
    assert torch.equal(a, b) and a.shape == (4, 3, 16, 16) and a.dtype == torch.float32
    assert G.training   # mode restored
    assert not torch.allclose(fam.sample(G, 2, cond=cond[:2]), fam.sample(G, 2, cond=cond[2:]))
    with pytest.raises(ValueError, match="cond"):
        fam.sample(G, 4)
    with pytest.raises(ValueError, match="n=3"):
        fam.sample(G, 3, cond=cond)
    with pytest.raises(ValueError, match="no mask"):
        fam.sample(G, 4, cond=cond, mask=cond[:, :1])


@pytest.mark.parametrize("channels", [1, 3])
def test_overfits_a_fixed_batch(channels):
    """The L1 term on 4 fixed pairs falls to under half in 30 steps (about a quarter, seeds 0-2)."""
    fam = tiny(channels=channels)
    torch.manual_seed(0)
    nets = fam.build()
    history = train(fam, nets, paired_batch(fam, n=4), steps=30)
    assert all(torch.isfinite(torch.tensor([h["loss_G"] for h in history])))
    assert mean(h["G_L1"] for h in history[-5:]) < 0.5 * history[0]["G_L1"]
