"""The sat2ground family: stage 1 (a DCGAN on a 4x4 latent, StepLR on G) and stage 2 (an encoder
trained against the frozen stage-1 generator named in the config), and the self-contained
stage-2 snapshot."""
from __future__ import annotations

import pydantic
import pytest
import torch
from torch import nn

from family_checks import ctx_for, has_grads, mean, smooth_batch, train
from models.registry import get_family_cls, make_family
from models.families.sat2ground import Sat2Ground, Sat2GroundConfig
from models.snapshot import load_snapshot, save_snapshot

NZ = 8


def stage1(resolution: int = 16, channels: int = 3, lr: float = 2e-4, **cfg) -> Sat2Ground:
    return make_family("sat2ground", {"ngf": 16, "ndf": 16, "nz": NZ, **cfg}, resolution=resolution,
                       channels=channels, lr=lr)


def stage2(generator_from: str, resolution: int = 16, channels: int = 3, lr: float = 1e-3, **cfg) -> Sat2Ground:
    return stage1(resolution, channels, lr, stage=2, generator_from=str(generator_from), **cfg)


@pytest.fixture
def stage1_file(tmp_path):
    """A stage-1 snapshot (untrained weights are as good as any for these checks)."""
    fam = stage1()
    torch.manual_seed(1)
    path = tmp_path / "stage1.pt"
    save_snapshot(path, fam, fam.build()["G"])
    return path


def test_registered_and_stage_attributes(stage1_file):
    assert get_family_cls("sat2ground") is Sat2Ground
    one, two = stage1(), stage2(stage1_file)
    assert (one.conditional, one.data_keys, one.metrics, one.sampler_role) == (False, ("image",), ("fid",), "G")
    assert (two.conditional, two.data_keys, two.sampler_role) == (True, ("cond", "image"), "E")
    assert two.metrics == ("mse", "ssim", "lpips", "fid")


def test_published_stage1_networks():
    """128x128 RGB from a (nz, 4, 4) latent through 5 stride-2 4x4 transposed convs; D mirrors it."""
    nets = make_family("sat2ground", resolution=128, channels=3, lr=2e-4).build()
    convs = [m for m in nets["G"].modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [(m.kernel_size, m.stride) for m in convs] == [((4, 4), (2, 2))] * 5
    assert nets["G"](torch.randn(2, 100, 4, 4)).shape == (2, 3, 128, 128)
    d_convs = [m for m in nets["D"].modules() if isinstance(m, nn.Conv2d)]
    assert [m.stride for m in d_convs] == [(2, 2)] * 5 + [(1, 1)]
    assert nets["D"](torch.randn(2, 3, 128, 128)).shape == (2,)


@pytest.mark.parametrize("channels", [1, 3])
def test_stage1_shapes_and_sample(channels):
    fam = stage1(channels=channels)
    G = fam.build()["G"]
    assert fam.latent_shape == (NZ, 4, 4)
    x = fam.sample(G, 3, seed=4)
    assert x.shape == (3, channels, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, fam.sample(G, 3, seed=4)) and not torch.equal(x, fam.sample(G, 3, seed=5))


def test_stage1_steplr_on_the_generator_only():
    g, d = stage1(lr_step_every=100, lr_gamma=0.5).phases()   # DCGAN's order: G first
    assert d.lr_step_every is None and d.lr_at(10_000) == d.lr
    assert (g.lr_at(0), g.lr_at(99), g.lr_at(100), g.lr_at(250)) == (2e-4, 2e-4, 1e-4, 5e-5)


def test_stage_config_validation(stage1_file):
    with pytest.raises(pydantic.ValidationError, match="generator_from"):
        Sat2GroundConfig(stage=2)
    with pytest.raises(pydantic.ValidationError, match="generator_from"):
        Sat2GroundConfig(generator_from=str(stage1_file))
    with pytest.raises(pydantic.ValidationError):
        Sat2GroundConfig(stage=3)


def test_stage1_overfits_discriminator():
    """D's loss on 8 fixed images falls below 3/4 of its start in 30 steps (to about 0.6, seeds 0-2)."""
    fam = stage1()
    torch.manual_seed(0)
    nets = fam.build()
    history = train(fam, nets, {"image": smooth_batch(8, 3, 16, seed=0)}, steps=30)
    assert mean(h["loss_D"] for h in history[-5:]) < 0.75 * history[0]["loss_D"]


def test_stage2_freezes_the_stage1_generator(stage1_file):
    _, g1, _ = load_snapshot(stage1_file)
    fam = stage2(stage1_file)
    net = fam.build()["E"]
    assert bool(net.generator_loaded)
    assert all(torch.equal(v, g1.state_dict()[k]) for k, v in net.generator.state_dict().items())
    # The generator's weights are buffers: no optimizer, DDP or requires_grad_ can reach them.
    assert list(net.generator.parameters()) == []
    assert {n.split(".")[0] for n, _ in net.named_parameters()} == {"encoder"}
    net.requires_grad_(True).train()
    assert not net.generator.training and net.encoder.training
    # Its output is the frozen generator applied to the encoder's latent.
    sat = smooth_batch(2, 3, 16, seed=3)
    net.eval()
    z = net.encoder(sat)
    assert z.shape == (2, NZ, 4, 4)
    assert torch.allclose(net(sat), g1(z))


def test_stage2_trains_the_encoder_only(stage1_file):
    fam = stage2(stage1_file, loss="combined")
    nets = fam.build()
    before = {k: v.clone() for k, v in nets["E"].generator.state_dict().items()}
    batch = {"cond": smooth_batch(4, 3, 16, seed=1), "image": smooth_batch(4, 3, 16, seed=2)}
    loss, logs = fam.loss(batch, ctx_for(nets, "E"))
    assert set(logs) == {"loss_E", "E_mse", "E_ssim", "E_perceptual"}
    loss.backward()
    assert all(has_grads(nets["E"]))
    train(fam, nets, batch, steps=3)
    assert all(torch.equal(before[k], v) for k, v in nets["E"].generator.state_dict().items())


def test_stage2_mismatch_and_missing_file(stage1_file, tmp_path):
    with pytest.raises(ValueError, match="nz: stage-1 generator 8, here 16"):
        stage2(stage1_file, nz=16).build()
    other = make_family("dcgan", {"ngf": 8, "ndf": 8}, resolution=16, channels=3, lr=1e-3)
    save_snapshot(tmp_path / "dcgan.pt", other, other.build()["G"])
    with pytest.raises(ValueError, match="not a sat2ground stage-1 model"):
        stage2(tmp_path / "dcgan.pt").build()
    # A path this worker cannot read: building works (a snapshot brings its own weights), training refuses.
    fam = stage2(tmp_path / "elsewhere.pt")
    nets = fam.build()
    with pytest.raises(RuntimeError, match="generator_from"):
        fam.loss({"cond": smooth_batch(2, 3, 16, 0), "image": smooth_batch(2, 3, 16, 1)}, ctx_for(nets, "E"))


@pytest.mark.parametrize("loss", ["mse", "ssim", "combined"])
def test_stage2_overfits_reachable_targets(stage1_file, loss):
    """Targets the frozen generator can make: the loss falls below 1/5 of its start in 30 steps
    (0.02-0.11 of it, seeds 0-2)."""
    fam = stage2(stage1_file, loss=loss)
    torch.manual_seed(0)
    nets = fam.build()
    with torch.no_grad():
        target = nets["E"].generator(torch.randn(4, NZ, 4, 4, generator=torch.Generator().manual_seed(0)))
    history = train(fam, nets, {"cond": smooth_batch(4, 3, 16, seed=10), "image": target}, steps=30)
    assert mean(h["loss_E"] for h in history[-5:]) < 0.2 * history[0]["loss_E"]


def test_stage2_snapshot_is_self_contained(tmp_path, channels=1):   # RGB: test_family_contract.py
    one = stage1(channels=channels)
    path = tmp_path / "stage1.pt"
    save_snapshot(path, one, one.build()["G"])
    fam = stage2(path, channels=channels)
    net = fam.build()["E"]
    sat = smooth_batch(3, channels, 16, seed=5)
    expected = fam.sample(net, 3, cond=sat)
    assert expected.shape == (3, channels, 16, 16) and expected.min() >= -1 and expected.max() <= 1
    save_snapshot(tmp_path / "stage2.pt", fam, net)
    path.unlink()   # served elsewhere: the stage-1 file is gone
    fam2, sampler, _ = load_snapshot(tmp_path / "stage2.pt")
    assert fam2.sampler_role == "E" and bool(sampler.generator_loaded)
    assert torch.equal(fam2.sample(sampler, 3, cond=sat), expected)
    with pytest.raises(ValueError, match="cond"):
        fam2.sample(sampler, 3)



def test_stage2_ssim_loss_is_scikit_images_ssim_on_0_1():
    """The `ssim` loss is 1 − SSIM of the images read in [0, 1] (data_range 1), as the metric and
    scikit-image compute it; on [-1, 1] with data_range 2 a 1% brightness shift near mid-grey
    would cost 0.48 instead of almost nothing."""
    import numpy as np
    from skimage.metrics import structural_similarity

    fam = stage2("/unused.pt", resolution=32, channels=1, loss="ssim")
    real = smooth_batch(2, 1, 32, seed=4) * 0.1            # near mid-grey
    for fake in (real + 0.02, smooth_batch(2, 1, 32, seed=5) * 0.5):
        loss, _ = fam.reconstruction_loss(fake, real)
        ref = np.mean([structural_similarity(((real[i, 0] + 1) / 2).numpy(), ((fake[i, 0] + 1) / 2).numpy(),
                                             data_range=1.0, gaussian_weights=True, sigma=1.5,
                                             use_sample_covariance=False) for i in range(2)])
        assert abs(float(loss) - (1 - ref)) < 1e-4
    shifted, _ = fam.reconstruction_loss(real + 0.02, real)
    assert float(shifted) < 0.01
