"""Metrics named for what they are, and equal to torchmetrics where torchmetrics computes the same.

- `lpips` is published LPIPS from a local weights file (`models.metrics.lpips`): on a small weights
  file made here (random AlexNet backbone and lin layers, in the reference module's state-dict
  layout), it equals torchmetrics' LPIPS module (a copy of the reference) loaded with the same file,
  to 1e-6. torchvision is not installed, so torchmetrics' backbone is built from the test's own list
  of AlexNet's layers (`_get_tv_model_features` patched); the rest of its computation is its own.
- Without weights a family's `lpips` is `perceptual_randconv`, in the suite's values, its reported
  names and the spec; ready specs that say `perceptual_randconv` parse.
- KID equals torchmetrics' `KernelInceptionDistance` on one full subset; PSNR is torchmetrics'
  per-image PSNR averaged. (SSIM deliberately averages torchmetrics' SSIM map the reference way,
  borders excluded: test_metrics_image_quality.py checks it against scikit-image.)
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from jobs.spec import SPECS_DIR, SpecError, load_spec
from models.metrics.kid import kid_from_features
from models.metrics.lpips import LPIPS
from models.metrics.suite import MetricSuite, named_for_weights, reported_names


def alexnet_features() -> nn.Sequential:
    """AlexNet's `features` as torchvision lays them out (written out here, independently of the module)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, 1, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, 1, 1), nn.ReLU(), nn.Conv2d(384, 256, 3, 1, 1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(3, 2))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, monkeypatch_module):
    """(torchmetrics' LPIPS module with random weights, the weights file it saved)."""
    from torchmetrics.functional.image import lpips as tm

    monkeypatch_module.setattr(tm, "_get_tv_model_features", lambda net, pretrained=False: alexnet_features())
    torch.manual_seed(0)
    net = tm._LPIPS(pretrained=False, net="alex", pnet_rand=True).eval()
    with torch.no_grad():
        for lin in net.lins:
            lin.model[1].weight.copy_(torch.rand_like(lin.model[1].weight))   # learned weights are >= 0
    path = tmp_path_factory.mktemp("lpips") / "lpips_alex.pth"
    torch.save(net.state_dict(), path)
    return net, path


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def pairs(n: int = 3, size: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    return a, (a + 0.3 * torch.randn(n, 3, size, size, generator=g)).clamp(-1, 1)


def test_lpips_from_a_weights_file_equals_torchmetrics(reference):
    net, path = reference
    ours = LPIPS(path)
    a, b = pairs()
    with torch.no_grad():
        want = net(a, b).flatten()
        got = ours(a, b)
    assert want.shape == got.shape == (3,) and (want > 0).all()
    assert torch.allclose(got, want, rtol=0, atol=1e-6), (got, want)
    assert ours(a, a).abs().max() < 1e-6
    assert ours.kind == "alex" and ours.name.startswith("lpips-alex/")


def test_the_suite_computes_lpips_with_weights_and_names_it_so(reference):
    net, path = reference
    a, b = pairs(4, seed=2)
    to_uint8 = lambda x: ((x + 1) * 127.5).round().to(torch.uint8)   # noqa: E731
    fake, real = to_uint8(a), to_uint8(b)
    suite = MetricSuite(["lpips", "ssim"], lpips_weights=str(path))
    suite.update(fake=fake, real=real)
    values = suite.compute()
    with torch.no_grad():
        want = net(fake.float() / 127.5 - 1, real.float() / 127.5 - 1).mean()
    assert set(values) == {"lpips", "ssim"} and values["lpips"] == pytest.approx(float(want), abs=1e-6)
    assert suite.params()["lpips_network"] == LPIPS(path).name
    assert reported_names(["lpips", "pr"], lpips_weights=str(path)) == ("lpips", "precision", "recall")


def test_without_weights_lpips_is_named_perceptual_randconv():
    assert named_for_weights(["lpips", "fid"]) == ("perceptual_randconv", "fid")
    assert named_for_weights(["lpips", "perceptual_randconv"]) == ("perceptual_randconv",)
    assert reported_names(["lpips", "ssim"]) == ("perceptual_randconv", "ssim")
    a, b = pairs(2, 32)
    suite = MetricSuite(["lpips"])
    suite.update(fake=((a + 1) * 127.5).to(torch.uint8), real=((b + 1) * 127.5).to(torch.uint8))
    assert set(suite.compute()) == {"perceptual_randconv"}
    assert "lpips" not in "".join(suite.params())   # no param says lpips but the note's value
    assert "asked for as lpips" in suite.params()["perceptual_randconv_note"]


def test_weights_files_of_another_layout_are_refused_naming_the_key(reference, tmp_path):
    net, path = reference
    state = torch.load(path, weights_only=True)
    lin_only = tmp_path / "lin_only.pth"      # the reference's own v0.1 file: lin layers alone
    torch.save({k: v for k, v in state.items() if k.startswith("lin")}, lin_only)
    with pytest.raises(ValueError, match="eval.lpips_weights .*missing"):
        LPIPS(lin_only)
    shifted = tmp_path / "shifted.pth"        # the reference keeps its scaling constants in the file
    torch.save({**state, "scaling_layer.shift": torch.zeros(1, 3, 1, 1)}, shifted)
    with pytest.raises(ValueError, match="scaling_layer.shift"):
        LPIPS(shifted)
    odd = tmp_path / "odd.pth"
    torch.save({**state, "lin0.model.1.weight": torch.ones(1, 32, 1, 1)}, odd)
    with pytest.raises(ValueError, match="channels"):
        LPIPS(odd)
    with pytest.raises(FileNotFoundError, match="eval.lpips_weights"):
        LPIPS(tmp_path / "absent.pth")
    exact = tmp_path / "with_constants.pth"
    torch.save({**state, "scaling_layer.shift": torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1),
                "scaling_layer.scale": torch.tensor([.458, .448, .450]).view(1, 3, 1, 1)}, exact)
    LPIPS(exact)


def test_specs_name_the_perceptual_metric_both_ways_and_the_weights_file():
    spec = load_spec(SPECS_DIR / "spatiotemporal_cgan.yaml", [])       # says perceptual_randconv
    old = load_spec(SPECS_DIR / "spatiotemporal_cgan.yaml", ["eval.metrics=[lpips,ssim,fid]"])
    for s in (spec, old):
        assert "perceptual_randconv" in reported_names(s.eval_metrics(s.make_family()))
    weighted = load_spec(SPECS_DIR / "spatiotemporal_cgan.yaml", ["eval.lpips_weights=/w/lpips_alex.pth",
                                                                  "eval.metrics=[lpips,ssim,fid]"])
    assert weighted.eval.weight_files()["eval.lpips_weights"] == "/w/lpips_alex.pth"
    assert weighted.eval.metrics == ["lpips", "ssim", "fid"]
    with pytest.raises(SpecError, match="write lpips for perceptual_randconv"):
        load_spec(SPECS_DIR / "spatiotemporal_cgan.yaml", ["eval.lpips_weights=/w/lpips_alex.pth"])


def test_kid_equals_torchmetrics_on_one_full_subset():
    from torchmetrics.image.kid import KernelInceptionDistance

    class Identity(nn.Module):
        def forward(self, x):
            return x

    g = torch.Generator().manual_seed(3)
    real = torch.randn(24, 8, generator=g, dtype=torch.float64)
    fake = torch.randn(24, 8, generator=g, dtype=torch.float64) + 0.3
    tm = KernelInceptionDistance(feature=Identity(), subsets=1, subset_size=24)
    tm.update(real, real=True)
    tm.update(fake, real=False)
    assert kid_from_features(real, fake, subsets=1, subset_size=24) == pytest.approx(float(tm.compute()[0]), abs=1e-6)


def test_psnr_equals_torchmetrics_per_image_mean():
    from torchmetrics.functional.image import peak_signal_noise_ratio

    g = torch.Generator().manual_seed(4)
    real = torch.randint(0, 256, (3, 3, 16, 16), generator=g, dtype=torch.uint8)
    fake = (real.int() + torch.randint(-20, 21, real.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    suite = MetricSuite(["psnr"])
    suite.update(fake=fake, real=real)
    f, r = fake.float() / 255, real.float() / 255
    want = torch.stack([peak_signal_noise_ratio(f[i:i + 1], r[i:i + 1], data_range=1.0) for i in range(3)]).mean()
    assert suite.compute()["psnr"] == pytest.approx(float(want), abs=1e-6)
