"""The dcgan family: shapes, the published networks, phases, loss, sampling and a short overfit
(what every family must do is checked in test_family_contract.py)."""
from __future__ import annotations

import pydantic
import pytest
import torch
from torch import nn

from family_checks import Recording, ctx_for, mean, param_count, train
from models.families.dcgan import DCGAN, DCGANConfig
from models.nets.dcgan import DCGANDiscriminator as Discriminator, DCGANGenerator as Generator
from models.registry import available_families, get_family_cls, make_family
from models.images import nchw_to_nhwc_numpy, to_float, to_uint8


def tiny_family(resolution: int = 16, channels: int = 3, lr: float = 1e-3, **cfg) -> DCGAN:
    return make_family("dcgan", {"ngf": 16, "ndf": 16, **cfg}, resolution=resolution, channels=channels, lr=lr)


def fixed_images(n: int = 8, channels: int = 3, size: int = 16) -> torch.Tensor:
    """n smooth, distinct images in [-1, 1]."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    planes = [torch.stack([torch.sin(3 * xx + i), torch.cos(3 * yy - i), xx * yy]) for i in range(n)]
    return torch.stack(planes)[:, :channels].clamp(-1, 1)


def test_registered():
    assert "dcgan" in available_families()
    cls = get_family_cls("dcgan")
    assert cls is DCGAN and cls.metrics == ("fid",) and cls.sampler_role == "G" and not cls.conditional


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("resolution", [16, 32])
def test_shapes_and_range(resolution, channels):
    nets = tiny_family(resolution, channels).build()
    x = nets["G"](torch.randn(5, 100, 1, 1))
    assert x.shape == (5, channels, resolution, resolution)
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0
    assert nets["D"](x).shape == (5,)


def test_default_widths_at_64():
    nets = make_family("dcgan", resolution=64, channels=3, lr=2e-4).build()
    x = nets["G"](torch.randn(2, 100))   # (N, nz) is accepted as well
    assert x.shape == (2, 3, 64, 64)
    assert nets["D"](x).shape == (2,)
    # The published DCGAN at 64x64: these are the PyTorch example's parameter counts.
    assert sum(p.numel() for p in nets["G"].parameters()) == 3_576_704
    assert sum(p.numel() for p in nets["D"].parameters()) == 2_765_568


def test_rsicb_structure_at_128():
    """The remote-sensing DCGAN (dcgan_rsicb.yaml): noise 100 -> 4x4, then 4 stride-2 transposed
    convs with BatchNorm + ReLU, then a transposed conv to the image with Tanh; D: 5 stride-2 convs
    with BatchNorm (all but the first) + LeakyReLU, then one logit."""
    nets = make_family("dcgan", resolution=128, channels=3, lr=2e-4).build()
    g = [m for m in nets["G"].modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [m.stride for m in g] == [(1, 1)] + [(2, 2)] * 4 + [(2, 2)] and g[-1].out_channels == 3
    assert sum(isinstance(m, nn.BatchNorm2d) for m in nets["G"].modules()) == 5   # projection + 4 up-blocks
    d = [m for m in nets["D"].modules() if isinstance(m, nn.Conv2d)]
    assert [m.stride for m in d] == [(2, 2)] * 5 + [(1, 1)] and d[-1].out_channels == 1
    assert sum(isinstance(m, nn.BatchNorm2d) for m in nets["D"].modules()) == 4
    assert (param_count(nets["G"]), param_count(nets["D"])) == (7_772_032, 6_960_896)


def test_max_channels_caps_widths():
    g = Generator(resolution=256, channels=3, ngf=64, max_channels=512)
    widths = [m.out_channels for m in g.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert widths == [512, 512, 512, 256, 128, 64, 3]
    d = Discriminator(resolution=256, channels=3, ndf=64, max_channels=512)
    assert [m.out_channels for m in d.modules() if isinstance(m, nn.Conv2d)] == [64, 128, 256, 512, 512, 512, 1]


@pytest.mark.parametrize("resolution", [4, 12, 48, 100])
def test_bad_resolution_names_the_field(resolution):
    with pytest.raises(ValueError, match=r"data\.resolution"):
        tiny_family(resolution)
    with pytest.raises(ValueError, match=r"data\.resolution"):
        Generator(resolution=resolution, channels=3)


def test_config_validation_and_phases():
    with pytest.raises(pydantic.ValidationError):
        DCGANConfig(nz=0)
    with pytest.raises(pydantic.ValidationError):
        DCGANConfig(ngff=3)   # unknown keys are refused
    g, d = make_family("dcgan", {"lr_g": 1e-3}, resolution=16, channels=1, lr=2e-4).phases()   # G makes the step's fake
    assert (d.name, d.lr, d.betas) == ("D", 2e-4, (0.5, 0.999))
    assert (g.name, g.lr) == ("G", 1e-3)


def test_sample_deterministic_in_seed_and_restores_mode():
    fam = tiny_family()
    G = fam.build()["G"]
    G.train()
    torch.manual_seed(123)
    a = fam.sample(G, 4, seed=7)
    torch.manual_seed(456)   # the global RNG must not matter
    b = fam.sample(G, 4, seed=7)
    c = fam.sample(G, 4, seed=8)
    assert a.shape == (4, 3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert a.min() >= -1 and a.max() <= 1
    assert G.training
    # Eval mode inside: BatchNorm used its running statistics and did not update them.
    before = {k: v.clone() for k, v in G.state_dict().items()}
    fam.sample(G, 4, seed=9)
    assert all(torch.equal(before[k], v) for k, v in G.state_dict().items())
    G.eval()
    fam.sample(G, 2, seed=0)
    assert not G.training


def test_loss_calls_the_trained_wrapper_and_real_fake_apart():
    fam = tiny_family()
    nets = fam.build()
    real = {"image": fixed_images(8)}
    wrapped_d, wrapped_g = Recording(nets["D"]), Recording(nets["G"])
    loss, logs = fam.loss(real, ctx_for(nets, "G", trained={"D": wrapped_d, "G": wrapped_g}))
    assert wrapped_g.calls == [(8, 100)] and wrapped_d.calls == []   # phase G calls the bare D
    assert set(logs) == {"loss_G"} and loss.ndim == 0

    loss, logs = fam.loss(real, ctx_for(nets, "D", trained={"D": wrapped_d, "G": wrapped_g}))
    assert wrapped_d.calls == [(8, 3), (8, 3)]   # real and fake in separate forward calls
    assert len(wrapped_g.calls) == 1             # D learns from phase G's fake: no second G forward
    assert set(logs) == {"loss_D", "D_real", "D_fake"}
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in logs.values())
    assert 0 < logs["D_real"] < 1 and 0 < logs["D_fake"] < 1

    with pytest.raises(ValueError, match="phase"):
        fam.loss(real, ctx_for(nets, "E"))


def test_noise_follows_ctx_generator():
    fam = tiny_family()
    nets = fam.build()
    for m in nets.values():
        m.eval()   # no BatchNorm statistics updates between the two calls
    batch = {"image": fixed_images(4)}
    a, _ = fam.loss(batch, ctx_for(nets, "G", generator=torch.Generator().manual_seed(3)))
    b, _ = fam.loss(batch, ctx_for(nets, "G", generator=torch.Generator().manual_seed(3)))
    c, _ = fam.loss(batch, ctx_for(nets, "G", generator=torch.Generator().manual_seed(4)))
    assert a.item() == b.item() != c.item()


def test_short_overfit_discriminator_learns_to_separate():
    torch.manual_seed(0)
    fam = tiny_family(resolution=16, lr=1e-3)
    history = train(fam, fam.build(), {"image": fixed_images(8)}, steps=30)
    loss_d = [h["loss_D"] for h in history]
    assert all(torch.isfinite(torch.tensor(loss_d)))
    # Starts near 2·ln 2 (D cannot tell); across seeds the last five average 0.2–0.35 of the start.
    assert mean(loss_d[-5:]) < 0.7 * loss_d[0]
    assert history[-1]["D_real"] > history[-1]["D_fake"]
    assert torch.isfinite(torch.tensor(history[-1]["loss_G"]))


def test_image_conversions_round_trip():
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).repeat(2, 3, 1, 1)
    f = to_float(x)
    assert f.dtype == torch.float32 and f.min() == -1 and f.max() == 1
    assert torch.equal(to_uint8(f), x)
    assert torch.equal(to_uint8(torch.tensor([-3.0, -1.0, 0.0, 1.0, 7.0])), torch.tensor([0, 0, 128, 255, 255], dtype=torch.uint8))
    a = nchw_to_nhwc_numpy(x)
    assert a.shape == (2, 16, 16, 3) and a.dtype == "uint8" and a[1, 0, 1, 2] == 1
    with pytest.raises(TypeError):
        to_float(f)
