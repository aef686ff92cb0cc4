"""The dcgan family: shapes, the published networks, phases, loss, sampling, a short overfit, and
its step through the real loop: one fake per micro-batch, made in phase G, that phase D learns from
detached; lazy R1 (what every family must do is checked in test_family_contract.py)."""
from __future__ import annotations

import pydantic
import pytest
import torch
from torch import nn

from family_checks import Recording, ctx_for, mean, param_count, train
from jobs.spec import SPECS_DIR, load_spec
from jobs.train.loop import build_training, train_step
from models.families.dcgan import DCGAN, DCGANConfig
from models.family import StepContext
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


# The step as training runs it: through the real loop's `train_step`.
CPU = torch.device("cpu")
TINY = ["data.resolution=16", "model.nz=8", "model.ngf=8", "model.ndf=8", "model.r1_gamma=0", "scaling.num_workers=1",
        "train.batch=8", "train.grad_accum=2"]


def tiny_training():
    spec = load_spec(SPECS_DIR / "quickstart.yaml", TINY)
    return spec, *build_training(spec, CPU, 1)


def random_batch(n: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 1, 16, 16, generator=g) * 2 - 1}


class Calls:
    """Forward hooks on G and D: G's outputs, and D's inputs in the phase that trains D."""

    def __init__(self, networks):
        self.g_out: list[torch.Tensor] = []
        self.d_in: list[torch.Tensor] = []
        networks["G"].register_forward_hook(lambda m, args, out: self.g_out.append(out))
        networks["D"].register_forward_hook(self._d)

    def _d(self, module, args, out):
        if any(p.requires_grad for p in module.parameters()):   # phase D: only D is trainable
            self.d_in.append(args[0])


def test_phases_run_g_first():
    _, family, _, phases, _ = tiny_training()
    assert [ph.name for ph in phases] == ["G", "D"] == [ph.name for ph in family.phases()]


def test_one_generator_forward_per_micro_batch_and_d_learns_from_it():
    spec, family, networks, phases, engines = tiny_training()
    calls = Calls(networks)
    for step in range(2):
        calls.g_out.clear()
        calls.d_in.clear()
        train_step(family, phases, engines, networks, random_batch(seed=step), step=step, device=CPU,
                   grad_accum=spec.train.grad_accum)
        assert len(calls.g_out) == spec.train.grad_accum   # one G forward per micro-batch, none in phase D
        # Phase D: real then fake per micro-batch; the fake is G's output of this step, without a graph.
        fakes = calls.d_in[1::2]
        assert len(fakes) == len(calls.g_out)
        for fake, made in zip(fakes, calls.g_out):
            assert made.requires_grad and not fake.requires_grad and fake.grad_fn is None
            assert torch.equal(fake, made.detach())


def test_phase_d_without_this_steps_phase_g_fails_clearly():
    _, family, networks, _, _ = tiny_training()
    real = random_batch(4)

    def ctx(phase: str, step: int) -> StepContext:
        return StepContext(networks=networks, trained=networks, phase=phase, step=step, device=CPU)

    with pytest.raises(RuntimeError, match="phase 'D' of step 0 found no fake of this step's phase 'G'"):
        family.loss(real, ctx("D", 0))
    family.loss(real, ctx("G", 0))
    family.loss(real, ctx("D", 0))
    with pytest.raises(RuntimeError, match="found no fake"):   # each fake serves one D micro-batch
        family.loss(real, ctx("D", 0))
    family.loss(real, ctx("G", 0))
    with pytest.raises(RuntimeError, match="phase 'D' of step 1"):   # a fake of step 0 is not step 1's
        family.loss(real, ctx("D", 1))
    family.loss(real, ctx("G", 2))
    with pytest.raises(RuntimeError, match="micro-batch of 2 but phase 'G' made 4"):
        family.loss(random_batch(2), ctx("D", 2))


def test_lazy_r1_matches_finite_differences():
    """Phase D adds r1_gamma / 2 · r1_every · mean_i ‖∂ΣD/∂x_i‖² on its R1 steps, nothing on the
    others; the gradient is checked against central differences of D in float64."""
    gamma, every = 0.5, 2
    spec = load_spec(SPECS_DIR / "quickstart.yaml", ["data.resolution=8", "model.nz=4", "model.ngf=2", "model.ndf=2",
                                                      f"model.r1_gamma={gamma}", f"model.r1_every={every}",
                                                      "scaling.num_workers=1", "train.batch=4"])
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        family = spec.make_family()
        networks = {role: net.double() for role, net in family.build().items()}
        real = torch.rand(4, 1, 8, 8) * 2 - 1
        d = networks["D"]

        def fd_penalty() -> float:
            flat, eps, grad = real.clone().reshape(-1), 1e-6, torch.zeros(real.numel())
            with torch.no_grad():
                for i in range(flat.numel()):
                    up, down = flat.clone(), flat.clone()
                    up[i] += eps
                    down[i] -= eps
                    grad[i] = (d(up.view_as(real)).sum() - d(down.view_as(real)).sum()) / (2 * eps)
            return grad.view(4, -1).square().sum(1).mean().item()

        for step, r1_step in ((0, True), (1, False)):
            ctx = {ph: StepContext(networks=networks, trained=networks, phase=ph, step=step, device=CPU)
                   for ph in ("G", "D")}
            family.loss({"image": real}, ctx["G"])
            loss, logs = family.loss({"image": real}, ctx["D"])
            if r1_step:
                expected = fd_penalty()
                assert logs["r1"].item() == pytest.approx(expected, rel=1e-5)
                assert (loss - logs["loss_D"]).item() == pytest.approx(gamma / 2 * every * expected, rel=1e-5)
            else:
                assert "r1" not in logs and loss.item() == logs["loss_D"].item()
    finally:
        torch.set_default_dtype(old)
