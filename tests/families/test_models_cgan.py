"""The spatio-temporal cGANs: past image ⊕ change mask -> future image, UNet with and without
attention gates; input handling, shapes, sampling and a short overfit for both."""
from __future__ import annotations

import pytest
import torch

from family_checks import ctx_for, mean, paired_batch, param_count, train
from models.families.cgan import CGANAttentionUNet, CGANUNet
from models.registry import get_family_cls, make_family
from models.nets.pix2pix_unet import AttentionGate

FAMILIES = ["cgan_unet", "cgan_attention_unet"]


def tiny(name: str, resolution: int = 16, channels: int = 3, lr: float = 1e-3, **cfg):
    return make_family(name, {"ngf": 16, "ndf": 16, "d_layers": 2, **cfg}, resolution=resolution, channels=channels,
                       lr=lr)


def test_registered():
    assert get_family_cls("cgan_unet") is CGANUNet and get_family_cls("cgan_attention_unet") is CGANAttentionUNet
    for name in FAMILIES:
        cls = get_family_cls(name)
        assert cls.conditional and cls.data_keys == ("cond", "mask", "image")
        assert cls.metrics == ("lpips", "ssim", "psnr", "fid", "f1")


def test_attention_is_the_only_difference():
    plain, att = tiny("cgan_unet").build(), tiny("cgan_attention_unet").build()
    assert not any(isinstance(m, AttentionGate) for m in plain["G"].modules())
    assert sum(isinstance(m, AttentionGate) for m in att["G"].modules()) == 3
    assert param_count(plain["D"]) == param_count(att["D"])
    assert param_count(att["G"]) > param_count(plain["G"])


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_range_and_input(name, channels):
    fam = tiny(name, channels=channels)
    nets = fam.build()
    batch = paired_batch(fam, n=3)
    # The generator sees the past image and the mask as channels + 1 inputs.
    x = fam.generator_input(batch["cond"], batch["mask"])
    assert x.shape == (3, channels + 1, 16, 16) and torch.equal(x[:, -1:], batch["mask"])
    out = nets["G"](x)
    assert out.shape == (3, channels, 16, 16) and out.min() >= -1 and out.max() <= 1
    assert nets["D"](torch.cat([x, out], 1)).shape == (3, 1, 2, 2)
    loss, logs = fam.loss(batch, ctx_for(nets, "G"))
    assert set(logs) == {"loss_G", "G_adv", "G_L1"} and torch.isfinite(loss)


@pytest.mark.parametrize("name", FAMILIES)
def test_sample_uses_the_mask(name):
    fam = tiny(name)
    G = fam.build()["G"]
    batch = paired_batch(fam, n=2)
    a = fam.sample(G, 2, cond=batch["cond"], mask=batch["mask"])
    assert torch.equal(a, fam.sample(G, 2, seed=5, cond=batch["cond"], mask=batch["mask"]))
    assert not torch.allclose(a, fam.sample(G, 2, cond=batch["cond"], mask=-batch["mask"]))
    with pytest.raises(ValueError, match="mask"):
        fam.sample(G, 2, cond=batch["cond"])
    with pytest.raises(ValueError, match="1 channel"):
        fam.sample(G, 2, cond=batch["cond"], mask=batch["cond"])


@pytest.mark.parametrize("name", FAMILIES)
def test_overfits_a_fixed_batch(name):
    """The L1 term on 4 fixed (past, mask) -> future triples falls to under half in 30 steps
    (about a quarter for seeds 0-2)."""
    fam = tiny(name)
    torch.manual_seed(0)
    nets = fam.build()
    history = train(fam, nets, paired_batch(fam, n=4), steps=30)
    assert mean(h["G_L1"] for h in history[-5:]) < 0.5 * history[0]["G_L1"]
    assert all(0 < h["D_real"] < 1 for h in history)

