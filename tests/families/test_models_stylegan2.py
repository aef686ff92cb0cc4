"""The stylegan2 family (SCB-GAN): shapes and ranges, which parameters each loss term trains,
the lazy regularisers, ADA's p on an overfitting and on a weak discriminator, the vision-aided
stages chosen by the linear probe, the generator EMA and the state a checkpoint keeps."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from family_checks import CPU, smooth_batch
from models.family import StepContext, StepEnd
from models.snapshot import load_snapshot, save_snapshot
from models.families.stylegan2 import StyleGAN2, StyleGAN2Config
from models.registry import make_family
from models.nets.vision_backbones import save_random_backbone

RES, N = 16, 4
TINY = {"z_dim": 16, "w_dim": 16, "mapping_layers": 2, "channel_base": 128, "channel_max": 16}
KINDS = ["clip_vitb32", "vgg16"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("backbones")
    return {k: str(save_random_backbone(k, d / f"{k}.pt", size="tiny", seed=i)) for i, k in enumerate(KINDS)}


def family(channels=1, vision=None, ada=None, **model) -> StyleGAN2:
    return make_family("stylegan2", StyleGAN2Config(**TINY, vision_aided=vision, **model), resolution=RES,
                       channels=channels, lr=2e-3, ada=ada)


def vision(weights, **over):
    return {"candidates": KINDS, "weights": weights, "size": "tiny", "warmup_kimg": 0.004,
            "kimg_stages": [0.004, 0.004], "probe_images": 8, **over}


def ctx(nets, phase, step=1) -> StepContext:
    return StepContext(networks=nets, trained=nets, phase=phase, step=step, device=CPU)


DATA = smooth_batch(12, 1, RES, seed=99)   # the data set as stored, un-augmented


def end(nets, step, batch=N, reals=None) -> StepEnd:
    return StepEnd(networks=nets, rank=0, step=step, batch=batch, device=CPU,
                   reals=reals or (lambda n: iter(DATA[:n].split(4))))


def grads_after(fam, nets, phase, step=1, channels=1):
    """Runs one phase's loss and backward with only that phase's network trainable (as the
    engines do); returns the loss, the logs and which parameters received a gradient."""
    for name, net in nets.items():
        net.requires_grad_(name == phase)
        for p in net.parameters():
            p.grad = None
    for bb in fam.backbones.values():
        for p in bb.parameters():
            p.grad = None
    loss, logs = fam.loss({"image": smooth_batch(N, channels, RES, seed=0)}, ctx(nets, phase, step))
    loss.backward()
    return loss, logs


@pytest.mark.parametrize("channels", [1, 3])
def test_samples_have_the_data_shape_and_range(channels):
    fam = family(channels)
    nets = fam.build()
    with torch.no_grad():   # an output layer whose raw images overshoot [-1, 1]
        for p in nets["G_ema"].parameters():
            p.mul_(3.0)
    out = fam.sample(nets["G_ema"], 3, seed=5)
    assert out.shape == (3, channels, RES, RES) and torch.isfinite(out).all()
    assert out.min() >= -1 and out.max() <= 1 and (out.abs() == 1).any()   # clipped as the reference writes images
    assert torch.equal(out, fam.sample(nets["G_ema"], 3, seed=5))          # deterministic in the seed
    assert not torch.equal(out, fam.sample(nets["G_ema"], 3, seed=6))
    assert fam.sampler_role == "G_ema" and set(nets) == {"G", "D", "G_ema"}


def test_d_loss_trains_d_and_the_added_heads_only(weights):
    torch.manual_seed(0)
    fam = family(vision=vision(weights), ada={"target": 0.6, "initial_p": 0.5})
    nets = fam.build()
    fam.active = ["vgg16"]
    loss, logs = grads_after(fam, nets, "D", step=16)   # step 16: lazy R1 is due
    assert torch.isfinite(loss) and {"loss_D", "r1", "loss_D_vision"} <= set(logs)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in nets["D"].main.parameters()
               if p.requires_grad and p.dim() > 1)
    heads = nets["D"].heads
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.parameters_of("vgg16"))
    # The head whose backbone is not added yet is in the graph with an exact zero gradient.
    assert all(p.grad is not None and not p.grad.any() for p in heads.parameters_of("clip_vitb32"))
    assert all(p.grad is None for p in nets["G"].parameters())
    assert all(p.grad is None for bb in fam.backbones.values() for p in bb.parameters())


def test_g_loss_trains_g_only_through_frozen_backbones(weights):
    torch.manual_seed(0)
    fam = family(vision=vision(weights), ada={"target": 0.6, "initial_p": 0.5})
    nets = fam.build()
    fam.active = ["clip_vitb32", "vgg16"]
    loss, logs = grads_after(fam, nets, "G", step=4)    # step 4: path length is due
    assert torch.isfinite(loss) and {"loss_G", "loss_G_vision", "pl_penalty"} <= set(logs)
    trained = [p for p in nets["G"].parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(trained) > 0.9 * len(list(nets["G"].parameters()))
    assert all(p.grad is None for p in nets["D"].parameters())
    assert all(p.grad is None for bb in fam.backbones.values() for p in bb.parameters())


def test_vision_loss_moves_g_differently(weights):
    """The heads' term really reaches the generator: its gradient changes with the term on."""
    fam = family(vision=vision(weights))
    nets = fam.build()
    grads = []
    for active in ([], ["clip_vitb32"]):
        fam.active = active
        torch.manual_seed(0)
        grads_after(fam, nets, "G", step=1)
        grads.append(torch.cat([p.grad.flatten() for p in nets["G"].parameters() if p.grad is not None]))
    assert not torch.allclose(grads[0], grads[1])


def test_regularisers_are_lazy():
    fam = family()
    nets = fam.build()
    _, d_logs = grads_after(fam, nets, "D", step=3)
    _, g_logs = grads_after(fam, nets, "G", step=3)
    assert "r1" not in d_logs and "pl_penalty" not in g_logs
    fam_off = family(r1_gamma=0, pl_weight=0)
    nets = fam_off.build()
    assert "r1" not in grads_after(fam_off, nets, "D", step=16)[1]
    assert "pl_penalty" not in grads_after(fam_off, nets, "G", step=4)[1]


@pytest.mark.parametrize("bias, direction", [(10.0, 1), (-10.0, -1)])
def test_ada_p_rises_on_an_overfitting_d_and_falls_on_a_weak_one(bias, direction):
    """An overfitting D calls every real image real (sign(D(real)) = 1 > 0.6): p must rise; a
    weak one calls them fake: p must fall."""
    fam = family(ada={"target": 0.6, "interval": 1, "speed_kimg": 0.1, "initial_p": 0.5})
    nets = fam.build()
    last = [m for m in nets["D"].main.modules() if isinstance(m, torch.nn.Linear) or hasattr(m, "bias")][-1]
    with torch.no_grad():
        last.bias.fill_(bias)
    ps = []
    for step in range(1, 4):
        fam.loss({"image": smooth_batch(N, 1, RES, seed=step)}, ctx(nets, "D", step))
        ps.append(fam.after_step(end(nets, step))["ada_p"])
    assert all((b - a) * direction > 0 for a, b in zip([0.5] + ps, ps)), ps


def test_stages_add_the_backbone_the_probe_prefers(weights):
    torch.manual_seed(0)
    fam = family(vision=vision(weights))
    nets = fam.build()
    logs = {}
    for step in range(1, 4):   # stages start at 4, 8 images: after steps 1 and 2 (batch 4)
        fam.loss({"image": smooth_batch(N, 1, RES, seed=step)}, ctx(nets, "D", step))
        logs[step] = fam.after_step(end(nets, step))
    assert [logs[s]["vision_stage"] for s in (1, 2, 3)] == [1.0, 2.0, 2.0]
    assert sorted(fam.active) == sorted(KINDS)
    first = fam.active[0]
    assert {f"probe_acc_{k}" for k in KINDS} <= set(logs[1])
    assert logs[1][f"probe_acc_{first}"] == max(logs[1][f"probe_acc_{k}"] for k in KINDS)


def test_the_probe_scores_the_data_sets_own_images(weights):
    """Not the (MineAug- and ADA-augmented) training batches: the reals come from StepEnd.reals,
    as many as `probe_images`, against as many generated images."""
    fam = family(vision=vision(weights))
    nets = fam.build()
    fam.loss({"image": -torch.ones(N, 1, RES, RES)}, ctx(nets, "D", 1))   # a batch unlike the data set
    asked, seen = [], {}
    fam._load_backbones(CPU)
    for kind, bb in fam.backbones.items():
        inner, calls = bb.pooled, seen.setdefault(kind, [])
        bb.pooled = lambda x, inner=inner, calls=calls: (calls.append(x.clone()), inner(x))[1]

    def reals(n):
        asked.append(n)
        return iter(DATA[:n].split(4))

    fam.after_step(end(nets, 1, reals=reals))
    assert asked == [8]                                   # probe_images of the tiny config
    for calls in seen.values():                           # per chunk: the reals, then as many fakes
        assert torch.equal(torch.cat(calls[0::2]), DATA[:8]) and sum(len(x) for x in calls[1::2]) == 8


def test_backbone_ada_adapts_without_the_main_ada(weights):
    """Each active backbone's p follows its own head on the reals (target 0.3) even with augment.ada off."""
    fam = family(vision=vision(weights))
    assert fam.ada is None
    nets = fam.build()
    fam.active = [KINDS[0]]
    fam._load_backbones(CPU)
    interval = fam.head_ada[KINDS[0]].interval
    for step in range(1, interval + 1):
        fam.loss({"image": smooth_batch(N, 1, RES, seed=step)}, ctx(nets, "D", step))
        logs = fam.after_step(end(nets, step))
    assert f"ada_p_{KINDS[0]}" in logs and "ada_p" not in logs
    assert logs[f"ada_p_{KINDS[0]}"] == pytest.approx(float(fam.head_ada[KINDS[0]].p))


def test_r1_is_taken_at_the_unaugmented_reals_through_the_augmentation():
    """Hand-worked: D(x) = Σ w·x and an "augmentation" x ↦ 2x give ∂D(A(x))/∂x = 2w, so
    R1 = 4|w|² per image; a gradient at the augmented images would give |w|²."""
    class Doubling(nn.Module):   # stands in for ADA: differentiable, no randomness
        def forward(self, x):
            return 2 * x

        def observe(self, logits):
            pass

    fam = family(r1_gamma=1.0)
    nets = fam.build()
    fam.ada = Doubling()
    w = torch.randn(1, RES, RES)

    class Linear(nn.Module):
        def forward(self, x):
            return (x * w).flatten(1).sum(dim=1)

    nets["D"].main = Linear()
    _, logs = fam.loss({"image": smooth_batch(N, 1, RES, seed=1)}, ctx(nets, "D", step=fam.config.r1_every))
    assert float(logs["r1"]) == pytest.approx(4 * float(w.square().sum()), rel=1e-5)


def test_generator_ema_follows_g():
    fam = family(ema_kimg=0.001)   # half-life of one image: a step of N images keeps 0.5**N of the gap
    nets = fam.build()
    with torch.no_grad():
        for p in nets["G"].parameters():
            p.add_(0.1)
    before = torch.cat([p.flatten() for p in nets["G_ema"].parameters()])
    fam.after_step(end(nets, 1))
    after = torch.cat([p.flatten() for p in nets["G_ema"].parameters()])
    g = torch.cat([p.detach().flatten() for p in nets["G"].parameters()])
    assert torch.allclose(after, g + 0.5 ** N * (before - g), rtol=1e-6, atol=1e-6)


def test_state_round_trip_and_snapshot(weights, tmp_path):
    fam = family(vision=vision(weights), ada={"target": 0.6})
    nets = fam.build()
    fam.active = ["vgg16"]
    fam.ada.set_p(0.3)
    other = family(vision=vision(weights), ada={"target": 0.6})
    other.load_state_dict(fam.state_dict())
    assert other.active == ["vgg16"] and float(other.ada.p) == pytest.approx(0.3)
    # The registered snapshot needs no backbone files: only G_ema.
    save_snapshot(tmp_path / "g.pt", fam, nets["G_ema"])
    loaded, sampler, _ = load_snapshot(tmp_path / "g.pt")
    assert torch.equal(loaded.sample(sampler, 2, seed=1), fam.sample(nets["G_ema"], 2, seed=1))


def test_missing_backbone_file_names_the_field(tmp_path):
    fam = family(vision={"candidates": ["vgg16"], "weights": {"vgg16": str(tmp_path / "nope.pt")}, "size": "tiny",
                         "kimg_stages": [1]})
    nets = fam.build()
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        fam.loss({"image": smooth_batch(N, 1, RES, seed=0)}, ctx(nets, "D"))
    fam = family(vision={"candidates": ["vgg16"], "size": "tiny", "kimg_stages": [1]})
    with pytest.raises(FileNotFoundError, match="model.vision_aided.weights.vgg16"):
        fam.loss({"image": smooth_batch(N, 1, RES, seed=0)}, ctx(fam.build(), "D"))
