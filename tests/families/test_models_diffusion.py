"""The diffusion family: the DDPM UNet, the ControlNet and its frozen base, the three
conditionings, DDIM sampling, EMA and the self-contained snapshots."""
from __future__ import annotations

import pydantic
import pytest
import torch
from torch import nn

from family_checks import CPU, ctx_for, mean, paired_batch, param_count, smooth_batch
from models.nets.controlnet import ControlledUNet, ControlNet
from models.families.diffusion import Diffusion, DiffusionConfig
from models.nets.ddpm_unet import DDPMUNet as UNet, SelfAttention
from models.family import StepEnd
from models.registry import get_family_cls, make_family
from models.snapshot import load_snapshot, save_snapshot

TINY = {"base_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [16, 8],
        "sample_steps": 8}


def tiny(resolution: int = 16, channels: int = 3, lr: float = 1e-3, **cfg) -> Diffusion:
    return make_family("diffusion", {**TINY, **cfg}, resolution=resolution, channels=channels, lr=lr)


def trained_like(net: nn.Module, seed: int = 0) -> nn.Module:
    """A stand-in for a trained network: DDPM starts its output convs at zero (the network then
    predicts 0 whatever its input), so those get small random weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return net


@pytest.fixture
def base_file(tmp_path):
    """An unconditional diffusion snapshot of the tiny layout (the base of the ControlNet tests)."""
    fam = tiny()
    torch.manual_seed(1)
    path = tmp_path / "base.pt"
    save_snapshot(path, fam, trained_like(fam.build()["ema"], seed=1))
    return path


def controlnet(base_file, **cfg) -> Diffusion:
    return tiny(conditioning="controlnet", base_from=str(base_file), **cfg)


def batch_for(fam: Diffusion, n: int = 4) -> dict[str, torch.Tensor]:
    return paired_batch(fam, n=n) if fam.conditional else {"image": smooth_batch(n, fam.channels, fam.resolution, 0)}


def control_params(net: ControlledUNet) -> set[int]:
    return {id(p) for p in net.control.parameters()}


def test_registered_and_conditioning_attributes(base_file):
    assert get_family_cls("diffusion") is Diffusion
    assert Diffusion.sampler_role == "ema"
    plain = tiny()
    assert (plain.conditional, plain.data_keys, plain.metrics) == (False, ("image",), ("fid", "kid"))
    for fam in (tiny(conditioning="concat"), controlnet(base_file)):
        assert (fam.conditional, fam.data_keys) == (True, ("cond", "mask", "image"))
        assert fam.metrics == ("lpips", "ssim", "psnr", "fid", "f1")
    assert [ph.name for ph in plain.phases()] == ["eps"] and plain.phases()[0].betas == (0.9, 0.999)


def test_config_validation(base_file):
    with pytest.raises(pydantic.ValidationError, match="base_from"):
        DiffusionConfig(conditioning="controlnet")
    with pytest.raises(pydantic.ValidationError, match="base_from"):
        DiffusionConfig(conditioning="concat", base_from=str(base_file))
    with pytest.raises(pydantic.ValidationError, match="sample_steps"):
        DiffusionConfig(timesteps=10, sample_steps=20)
    with pytest.raises(ValueError, match="attention_resolutions"):
        tiny(attention_resolutions=[32])
    with pytest.raises(ValueError, match="divisible"):
        tiny(resolution=18, channel_mult=[1, 2, 2], attention_resolutions=[])


@pytest.mark.parametrize("channels", [1, 3])
def test_unet_shapes_with_attention(channels):
    net = UNet(in_channels=channels, out_channels=channels, resolution=16, base_channels=16, channel_mult=[1, 2, 2],
               num_res_blocks=2, attention_resolutions=[8, 4])
    # Attention after each block of the 8x8 and 4x4 levels (2 + 3 + 2 + 3) and in the middle.
    assert sum(isinstance(m, SelfAttention) for m in net.modules()) == 11
    x, t = torch.randn(2, channels, 16, 16), torch.tensor([0, 999])
    assert net(x, t).shape == (2, channels, 16, 16)
    assert net(x, torch.tensor(5)).shape == (2, channels, 16, 16)   # one step for the whole batch
    assert len(net.encoder.skip_channels) == 1 + 3 * 2 + 2          # input conv, blocks, downsamplings


def test_published_network_size():
    """DDPM's CIFAR-10 network (width 128, [1, 2, 2, 2], 2 blocks, attention at 16x16): 35.7M parameters."""
    fam = make_family("diffusion", {"base_channels": 128}, resolution=32, channels=3, lr=2e-4)
    assert round(param_count(fam.build()["eps"]) / 1e6, 1) == 35.7


@pytest.mark.parametrize("conditioning", ["none", "concat"])
def test_loss_reaches_every_parameter(conditioning):
    fam = tiny(conditioning=conditioning)
    nets = fam.build()
    trained_like(nets["eps"])
    loss, logs = fam.loss(batch_for(fam), ctx_for(nets, "eps", generator=torch.Generator().manual_seed(0)))
    assert set(logs) == {"loss_eps"} and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in nets["eps"].parameters())
    assert all(p.grad is None for p in nets["ema"].parameters())


def test_concat_sees_past_image_and_mask():
    fam = tiny(conditioning="concat")
    eps = fam.build()["eps"]
    assert eps.encoder.conv_in.in_channels == 3 + 3 + 1
    trained_like(eps)
    b = paired_batch(fam, n=2)
    a = fam.sample(eps, 2, seed=0, cond=b["cond"], mask=b["mask"])
    assert a.shape == (2, 3, 16, 16)
    assert not torch.equal(a, fam.sample(eps, 2, seed=0, cond=b["cond"], mask=-b["mask"]))
    with pytest.raises(ValueError, match="mask"):
        fam.sample(eps, 2, cond=b["cond"])
    with pytest.raises(ValueError, match="channels"):
        fam.sample(eps, 2, cond=b["cond"], mask=b["cond"])
    with pytest.raises(ValueError, match="unconditional"):
        tiny().sample(tiny().build()["ema"], 2, cond=b["cond"], mask=b["mask"])


def test_controlnet_starts_as_its_base():
    torch.manual_seed(0)
    base = trained_like(UNet(in_channels=3, out_channels=3, resolution=16, base_channels=16, channel_mult=[1, 2],
                             num_res_blocks=1, attention_resolutions=[8]))
    net = ControlledUNet(base, ControlNet(base, cond_channels=4)).train()
    x, t, cond = torch.randn(2, 3, 16, 16), torch.tensor([10, 700]), torch.randn(2, 4, 16, 16)
    expected = base(x, t)
    assert expected.abs().sum() > 0
    assert torch.equal(net(x, t, cond), expected)
    # The copy holds the base's encoder weights; the base stays in eval mode (no dropout) while training.
    assert all(torch.equal(a, b) for a, b in zip(net.control.encoder.state_dict().values(),
                                                 base.encoder.state_dict().values()))
    assert not net.base.training and net.control.training


def test_controlnet_trains_the_control_only(base_file):
    fam = controlnet(base_file)
    nets = fam.build()
    net = nets["eps"]
    assert bool(net.base_loaded)
    _, base, _ = load_snapshot(base_file)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in net.base.state_dict().items())
    net.requires_grad_(True)   # what a generic loop may do: the base stays frozen
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == control_params(net)
    b = paired_batch(fam, n=2)
    x, t = smooth_batch(2, 3, 16, seed=5), torch.tensor([20, 400])
    hint = fam.condition(b["cond"], b["mask"])
    before = base.eval()(x, t)
    assert torch.equal(net(x, t, hint), before)
    opt = torch.optim.Adam(trainable, lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        loss, _ = fam.loss(b, ctx_for(nets, "eps", generator=gen))
        loss.backward()
        assert all(p.grad is None for p in net.base.parameters())
        if step == 0:   # at first only the zero convs see a gradient: everything else feeds them
            zero_convs = {id(p) for p in [*net.control.zero_convs.parameters(), *net.control.zero_mid.parameters()]}
            assert all((p.grad.abs().sum() > 0) == (id(p) in zero_convs) for p in net.control.parameters())
        opt.step()
        if step == 0:
            assert not torch.equal(net(x, t, hint), before)
    # By the third step the gradient has reached every control parameter.
    assert all(p.grad.abs().sum() > 0 for p in net.control.parameters())
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in net.base.state_dict().items())


def test_engine_optimises_the_control_only(base_file):
    from jobs.train.engines import DDPEngine
    from jobs.spec import SPECS_DIR, load_spec

    spec = load_spec(SPECS_DIR / "spatiotemporal_controlnet.yaml",
                     ["data.resolution=16", "train.steps=2", f"model.base_from={base_file}"])
    fam = controlnet(base_file)
    net = fam.build()["eps"]
    engine = DDPEngine(net, fam.phases()[0], CPU, spec, world_size=1)
    optimised = {id(p) for group in engine.optimizer.param_groups for p in group["params"]}
    assert optimised == control_params(net)
    engine.set_trainable(False)
    engine.set_trainable(True)
    assert not any(p.requires_grad for p in net.base.parameters())


def test_controlnet_base_checks(base_file, tmp_path):
    with pytest.raises(ValueError, match=r"model.base_from: .*base_channels: base 16, here 8"):
        controlnet(base_file, base_channels=8).build()
    concat = tiny(conditioning="concat")
    save_snapshot(tmp_path / "concat.pt", concat, concat.build()["ema"])
    with pytest.raises(ValueError, match="model.base_from: .*not an unconditional diffusion model"):
        controlnet(tmp_path / "concat.pt").build()
    # A path this worker cannot read: building works (a snapshot brings its own base), training refuses.
    fam = controlnet(tmp_path / "elsewhere.pt")
    nets = fam.build()
    with pytest.raises(RuntimeError, match="base_from"):
        fam.loss(paired_batch(fam, n=2), ctx_for(nets, "eps"))


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_sample_is_deterministic_in_seed(eta):
    fam = tiny(ddim_eta=eta)
    G = trained_like(fam.build()["ema"])
    torch.manual_seed(123)
    a = fam.sample(G, 3, seed=4)
    torch.manual_seed(456)   # the global RNG plays no part
    assert a.shape == (3, 3, 16, 16) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, fam.sample(G, 3, seed=4)) and not torch.equal(a, fam.sample(G, 3, seed=5))
    assert len(fam.sampling_scheduler().timesteps) == TINY["sample_steps"]


@pytest.mark.parametrize("timesteps, steps", [(1000, 50), (100, 5), (1000, 3)])
def test_ddim_starts_from_pure_noise(timesteps, steps):
    """Trailing spacing, written out from Lin et al. 2024 (Table 2): round(arange(T, 0, -T/S)) - 1,
    so the first step is t = T - 1 (the leading default would start at T - T/S)."""
    import numpy as np

    got = tiny(timesteps=timesteps, sample_steps=steps).sampling_scheduler().timesteps
    want = np.round(np.arange(timesteps, 0, -timesteps / steps)).astype(np.int64) - 1
    assert got.tolist() == want.tolist() and int(got[0]) == timesteps - 1


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedules(schedule):
    fam = tiny(schedule=schedule, timesteps=100, sample_steps=5)
    abar = fam.noise_scheduler.alphas_cumprod
    assert len(abar) == 100 and abar[0] > 0.99 and abar[-1] < 0.01 and bool((abar[1:] < abar[:-1]).all())
    nets = fam.build()
    loss, _ = fam.loss(batch_for(fam), ctx_for(nets, "eps"))
    assert torch.isfinite(loss)
    assert fam.sample(nets["ema"], 2, seed=0).shape == (2, 3, 16, 16)


def test_schedules_differ():
    cos, lin = (tiny(schedule=s).noise_scheduler.alphas_cumprod for s in ("cosine", "linear"))
    assert cos[500] > lin[500] + 0.1   # cosine destroys information more slowly in the middle


def test_ema_moves_towards_the_trained_weights(base_file):
    for fam in (tiny(), controlnet(base_file)):
        nets = fam.build()
        trained = nets["eps"].control if fam.config.conditioning == "controlnet" else nets["eps"]
        ema = nets["ema"].control if fam.config.conditioning == "controlnet" else nets["ema"]
        base_before = {k: v.clone() for k, v in getattr(nets["ema"], "base", nn.Identity()).state_dict().items()}
        with torch.no_grad():
            for p in trained.parameters():
                p.add_(0.1)

        @torch.no_grad()
        def gap() -> float:
            return sum(float((a - b).abs().sum()) for a, b in zip(ema.parameters(), trained.parameters()))

        start = gap()
        logs = fam.after_step(StepEnd(networks=nets, rank=0, step=1, batch=4, device=CPU))
        assert logs["ema_decay"] == pytest.approx(2 / 11)   # warm-up: (1 + n) / (10 + n)
        assert gap() == pytest.approx(start * 2 / 11, rel=1e-4)
        late = fam.after_step(StepEnd(networks=nets, rank=0, step=10**7, batch=4, device=CPU))
        assert late["ema_decay"] == fam.config.ema_decay
        if fam.config.conditioning == "controlnet":
            assert all(torch.equal(v, base_before[k]) for k, v in nets["ema"].base.state_dict().items())


def test_overfits_a_fixed_batch():
    """ε-prediction on 4 fixed images: the loss starts at 1 (the zero-initialised output predicts
    0); over the last 10 of 50 steps it averages under half its first 5 (0.16-0.23 vs about 0.93
    for seeds 0-2)."""
    fam = tiny(lr=2e-3, dropout=0.0)
    torch.manual_seed(0)
    nets = fam.build()
    batch = batch_for(fam)
    opt = torch.optim.Adam(nets["eps"].parameters(), lr=fam.lr, betas=fam.phases()[0].betas)
    gen = torch.Generator().manual_seed(0)
    history = []
    for _ in range(50):
        loss, _ = fam.loss(batch, ctx_for(nets, "eps", generator=gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert history[0] == pytest.approx(1.0, abs=0.2)
    assert mean(history[-10:]) < 0.5 * mean(history[:5])


def test_snapshot_round_trip_unconditional(tmp_path):
    fam = tiny(channels=1)
    nets = fam.build()
    trained_like(nets["ema"])
    save_snapshot(tmp_path / "g.pt", fam, nets["ema"])
    loaded, sampler, _ = load_snapshot(tmp_path / "g.pt")
    assert loaded.name == "diffusion" and not loaded.conditional and loaded.channels == 1
    assert torch.equal(fam.sample(nets["ema"], 2, seed=3), loaded.sample(sampler, 2, seed=3))


def test_snapshot_round_trip_controlnet_without_the_base_file(base_file, tmp_path):
    fam = controlnet(base_file)
    nets = fam.build()
    with torch.no_grad():   # a ControlNet that has learnt something: non-zero residuals
        trained_like(nets["ema"].control)
    b = paired_batch(fam, n=2)
    expected = fam.sample(nets["ema"], 2, seed=1, cond=b["cond"], mask=b["mask"])
    save_snapshot(tmp_path / "cn.pt", fam, nets["ema"])
    base_file.unlink()
    loaded, sampler, _ = load_snapshot(tmp_path / "cn.pt")
    assert loaded.config.conditioning == "controlnet" and bool(sampler.base_loaded)
    assert torch.equal(loaded.sample(sampler, 2, seed=1, cond=b["cond"], mask=b["mask"]), expected)
