"""StyleGAN2 networks and regularisers: shapes, scale, truncation, noise, minibatch std, gradients."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from models.losses.stylegan2 import PathLengthPenalty, r1_penalty, style_mixing_ws
from models.nets.stylegan2 import (
    StyleGAN2Discriminator,
    bias_act,
    StyleGAN2Generator,
    MappingNetwork,
    SynthesisLayer,
    downsample2d,
    fir_kernel,
    minibatch_std,
    paper256_kwargs,
    upsample2d,
)

TINY = dict(channel_base=256, channel_max=32)


def tiny_g(resolution=16, channels=3, architecture="skip", **kw) -> StyleGAN2Generator:
    return StyleGAN2Generator(32, 32, resolution=resolution, channels=channels, mapping_layers=2,
                     architecture=architecture, **{**TINY, **kw})


def tiny_d(resolution=16, channels=3, **kw) -> StyleGAN2Discriminator:
    return StyleGAN2Discriminator(resolution=resolution, channels=channels, **{**TINY, **kw})


@pytest.mark.parametrize("architecture", ["skip", "resnet"])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_and_finite(architecture, channels):
    torch.manual_seed(0)
    clamp = 256 if channels == 3 else None
    g, d = tiny_g(16, channels, architecture, conv_clamp=clamp), tiny_d(16, channels, conv_clamp=clamp)
    img = g(torch.randn(4, 32))
    assert img.shape == (4, channels, 16, 16) and torch.isfinite(img).all()
    logits = d(img)
    assert logits.shape == (4, 1) and torch.isfinite(logits).all()


@pytest.mark.parametrize("resolution", [8, 16, 32])
def test_num_ws(resolution):
    g = tiny_g(resolution)
    expected = 2 * (resolution.bit_length() - 1) - 2
    assert g.num_ws == g.synthesis.num_ws == g.mapping.num_ws == expected
    assert g(torch.randn(2, 32)).shape[-1] == resolution
    with pytest.raises(ValueError):
        g.synthesis(torch.randn(2, expected + 1, 32))


def test_bad_resolution():
    for r in (4, 12, 24):
        with pytest.raises(ValueError):
            tiny_g(r)


def test_autocast_bf16():
    torch.manual_seed(0)
    g, d = tiny_g(16, 1, "resnet"), tiny_d(16, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = d(g(torch.randn(2, 32)))
    assert logits.shape == (2, 1) and torch.isfinite(logits.float()).all()
    logits.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in g.parameters() if p.grad is not None)


def test_fir_resampling():
    x = torch.ones(2, 5, 8, 8)
    up, down = upsample2d(x, fir_kernel()), downsample2d(x, fir_kernel())
    assert up.shape == (2, 5, 16, 16) and down.shape == (2, 5, 4, 4)
    # unit DC gain away from the (zero-padded) border
    assert torch.allclose(up[..., 2:-2, 2:-2], torch.ones(1)) and torch.allclose(down[..., 1:-1, 1:-1], torch.ones(1))


def test_demodulation_keeps_scale():
    """Activations stay O(1) through every layer, even when the styles are large."""
    torch.manual_seed(0)
    g = tiny_g(32, 3, channel_base=1024, channel_max=64)
    stds = []
    hooks = [m.register_forward_hook(lambda m, i, o: stds.append(o.std().item()))
             for m in g.modules() if isinstance(m, SynthesisLayer)]
    ws = g.mapping(torch.randn(8, 32)) * 10        # 10x styles: demodulation cancels them
    g.synthesis(ws, noise_mode="none")
    for h in hooks:
        h.remove()
    assert len(stds) == 2 * 4 - 1
    assert all(0.1 < s < 10 for s in stds), stds


def test_truncation_and_w_avg():
    torch.manual_seed(0)
    m = MappingNetwork(16, 8, num_ws=4, layers=2)
    z = torch.randn(5, 16)
    assert torch.equal(m.w_avg, torch.zeros(8))
    m(z)                                               # no update unless asked
    assert torch.equal(m.w_avg, torch.zeros(8))
    w = m(z, update_w_avg=True)
    assert torch.allclose(m.w_avg, 0.005 * w[:, 0].mean(0), atol=1e-6)
    ws = m(torch.randn(3, 16), psi=0.0)
    assert ws.shape == (3, 4, 8) and torch.equal(ws, m.w_avg.expand(3, 4, 8))
    assert "w_avg" in m.state_dict()


def test_noise_modes():
    torch.manual_seed(0)
    g = tiny_g()
    for m in g.modules():
        if isinstance(m, SynthesisLayer):
            nn.init.constant_(m.noise_strength, 0.5)
    ws = g.mapping(torch.randn(2, 32))
    assert torch.equal(g.synthesis(ws, noise_mode="const"), g.synthesis(ws, noise_mode="const"))
    assert torch.equal(g.synthesis(ws, noise_mode="none"), g.synthesis(ws, noise_mode="none"))
    assert not torch.equal(g.synthesis(ws, noise_mode="random"), g.synthesis(ws, noise_mode="random"))
    with pytest.raises(ValueError):
        g.synthesis(ws, noise_mode="bogus")


@pytest.mark.parametrize("n", [1, 2, 6])
def test_minibatch_std_batches(n):
    torch.manual_seed(0)
    x = torch.randn(n, 4, 4, 4)
    y = minibatch_std(x, group=4)
    assert y.shape == (n, 5, 4, 4) and torch.isfinite(y).all()
    assert tiny_d(8)(torch.randn(n, 3, 8, 8)).shape == (n, 1)


def test_minibatch_std_groups():
    """batch 6, group 4 -> groups of 3 (largest divisor <= 4): samples {0, 2, 4} and {1, 3, 5}."""
    x = torch.zeros(6, 1, 1, 1)
    x[[1, 3, 5]] = torch.tensor([0.0, 3.0, 6.0])[:, None, None, None]
    y = minibatch_std(x, group=4)[:, 1, 0, 0]
    assert torch.allclose(y[[0, 2, 4]], torch.full((3,), 1e-4), atol=1e-5)
    assert torch.allclose(y[[1, 3, 5]], torch.full((3,), 6.0).sqrt())


@pytest.mark.parametrize("architecture", ["skip", "resnet"])
def test_gradients_reach_every_parameter(architecture):
    torch.manual_seed(0)
    g, d = tiny_g(16, 3, architecture), tiny_d(16, 3)
    d(g(torch.randn(4, 32))).sum().backward()
    for name, p in [*g.named_parameters(), *d.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_r1_penalty():
    torch.manual_seed(0)
    x = torch.randn(3, 1, 8, 8, requires_grad=True)
    const_bias = nn.Parameter(torch.ones(1))
    assert torch.equal(r1_penalty(const_bias.expand(3, 1) * 1.0, x), torch.zeros(3))
    d = tiny_d(8, 1)
    r1 = r1_penalty(d(x), x)
    assert r1.shape == (3,) and (r1 > 0).all()
    r1.mean().backward()                              # create_graph: the penalty trains D
    # every weight (biases of the last layers do not change dD/dx)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in d.named_parameters() if "weight" in n)


def test_style_mixing():
    torch.manual_seed(0)
    g = tiny_g()
    z = torch.randn(4, 32)
    plain = g.mapping(z)
    assert torch.equal(style_mixing_ws(g.mapping, z, 0.0, g.num_ws), plain)
    mixed = style_mixing_ws(g.mapping, z, 1.0, g.num_ws, generator=torch.Generator().manual_seed(1))
    assert torch.equal(mixed[:, 0], plain[:, 0]) and not torch.equal(mixed[:, -1], plain[:, -1])
    again = style_mixing_ws(g.mapping, z, 1.0, g.num_ws, generator=torch.Generator().manual_seed(1))
    assert torch.equal(mixed, again)


def test_path_length_penalty():
    torch.manual_seed(0)
    g = tiny_g()
    pl = PathLengthPenalty()
    assert "pl_mean" in pl.state_dict() and pl.pl_mean.item() == 0
    means = []
    for _ in range(2):
        ws = style_mixing_ws(g.mapping, torch.randn(4, 32), 0.9, g.num_ws)
        penalty = pl(g.synthesis(ws), ws)
        means.append(pl.pl_mean.item())
        assert penalty.dim() == 0 and torch.isfinite(penalty)
    assert 0 < means[0] < means[1]
    penalty.backward()
    assert g.synthesis.blocks[0].conv1.weight.grad is not None


def test_path_length_norm_sums_over_w_dims_and_averages_over_styles():
    """Against the formula written out by hand: for a generator that is linear in ws,
    img = Σ_k ws[:, k] @ A_k, the gradient of Σ img·y w.r.t. ws[:, k] is A_k @ y, so the length is
    sqrt(mean_k |A_k y|²), with |.|² summed over w's dimensions."""
    torch.manual_seed(0)
    n, num_ws, w_dim, h = 3, 5, 7, 4
    a = torch.randn(num_ws, w_dim, h * h)
    ws = torch.randn(n, num_ws, w_dim, requires_grad=True)
    images = torch.einsum("nkd,kdp->np", ws, a).reshape(n, 1, h, h)
    pl = PathLengthPenalty(decay=1.0)      # decay 1: pl_mean becomes this batch's mean length
    gen = torch.Generator().manual_seed(3)
    penalty = pl(images, ws, generator=gen)
    y = torch.randn(images.shape, generator=torch.Generator().manual_seed(3)) / h
    per_style = torch.einsum("kdp,np->nkd", a, y.reshape(n, -1))            # dL/dws, (n, num_ws, w_dim)
    lengths = torch.tensor([[float(per_style[i, k].pow(2).sum()) for k in range(num_ws)] for i in range(n)]
                           ).mean(dim=1).sqrt()
    assert torch.allclose(pl.pl_mean, lengths.mean(), rtol=1e-5)
    assert torch.allclose(penalty, (lengths - lengths.mean()).square().mean(), rtol=1e-4, atol=1e-8)


def test_activation_clamp_scales_with_the_layer_gain():
    """bias_act(x, b, lrelu, clamp=c, gain=g) = clamp(g·sqrt(2)·lrelu(x + b), ±c·g), written out."""
    x = torch.tensor([[-3.0, -0.5, 0.5, 200.0, 400.0]])
    b = torch.zeros(5)
    g, c = 0.5 ** 0.5, 256.0
    lrelu = torch.where(x > 0, x, 0.2 * x) * 2 ** 0.5 * g
    want = lrelu.clamp(-c * g, c * g)
    torch.testing.assert_close(bias_act(x[:, :, None], b, True, c, g)[:, :, 0], want)
    assert float(bias_act(x[:, :, None], b, True, c, g).max()) == pytest.approx(c * g)   # 181.02, not 256


def test_paper256_kwargs():
    kw = paper256_kwargs()
    assert kw == dict(z_dim=512, w_dim=512, mapping_layers=8, channel_base=32768, channel_max=512,
                      mbstd_group=4, conv_clamp=256)
    assert set(paper256_kwargs("G")) <= set(kw) and "mbstd_group" in paper256_kwargs("D")


def test_paper256_param_count():
    """Cheap to build on CPU (no forward); printed for reference."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    g = StyleGAN2Generator(resolution=256, channels=1, **paper256_kwargs("G"))
    d = StyleGAN2Discriminator(resolution=256, channels=1, **paper256_kwargs("D"))
    print(f"paper256 1-channel: G {count(g):,} (mapping {count(g.mapping):,}), D {count(d):,}")
    assert g.num_ws == 14 and 20e6 < count(g) < 40e6 and 20e6 < count(d) < 40e6
