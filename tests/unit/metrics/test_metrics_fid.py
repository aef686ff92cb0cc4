"""FID with the offline extractors: sanity of the distance, determinism, the Inception loading path."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.metrics.extractors import InceptionExtractor, RandConvExtractor, make_extractor
from models.metrics.fid import frechet_distance


def smooth_images(n: int, seed: int, channels: int = 3, size: int = 32) -> Tensor:
    """n uint8 images of smooth random colour fields (a stand-in for a real data set)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, 4, 4, generator=g)
    return (F.interpolate(coarse, size=size, mode="bilinear", align_corners=False) * 255).round().to(torch.uint8)


def test_fid_zero_on_itself_and_ordered():
    real = smooth_images(128, seed=0)
    g = torch.Generator().manual_seed(1)
    perturbed = (real.int() + torch.randint(-4, 5, real.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    noise = torch.randint(0, 256, real.shape, generator=g, dtype=torch.uint8)
    ex = RandConvExtractor()

    fid_noise = frechet_distance(real.split(32), noise.split(50), ex)
    fid_self = frechet_distance(real.split(32), real.split(64), ex)
    fid_pert = frechet_distance(real.split(32), perturbed.split(32), ex)
    fid_other = frechet_distance(real.split(32), smooth_images(128, seed=2).split(32), ex)
    assert fid_noise > 0
    assert abs(fid_self) < 1e-3 * fid_noise
    assert fid_pert > 0 and fid_noise > 100 * fid_pert
    # Another draw of the same distribution is close, yet farther than a faint perturbation.
    assert fid_pert < fid_other < 0.2 * fid_noise


def test_fid_handles_grey_and_multiband_and_needs_two_images():
    ex = make_extractor("randconv")
    grey = smooth_images(16, seed=0, channels=1)
    bands = smooth_images(16, seed=0, channels=5)
    # 5 bands are read as their first three; grey is repeated to RGB.
    assert torch.equal(ex(bands), ex(bands[:, :3]))
    assert torch.equal(ex(grey), ex(grey.repeat(1, 3, 1, 1)))
    assert frechet_distance([grey], [grey[:8], grey[8:]], ex) == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance([grey], [grey[:1]], ex)
    with pytest.raises(TypeError, match="uint8"):
        frechet_distance([grey.float()], [grey], ex)


def test_randconv_identical_in_fresh_instances():
    x = smooth_images(6, seed=3, size=48)
    a, b = RandConvExtractor(), RandConvExtractor()
    torch.manual_seed(99)   # the global RNG has no say in the weights
    fa, fb = a(x), b(x)
    assert fa.shape == (6, 64) and fa.dtype == torch.float32
    assert torch.equal(fa, fb)
    assert fa.std(dim=0).min() > 0   # every feature varies across images
    # Pinned first weights: they change only with a new extractor name (version).
    assert RandConvExtractor.name == "orbitgen-randconv64-v1"
    assert a.w0.flatten()[:3].tolist() == pytest.approx([-0.3123052, -0.0920139, 0.0156442], abs=1e-6)


class TinyTorchScriptNet(nn.Module):
    """Has the call signature of NVIDIA's TorchScript Inception / VGG-16 (features are not meaningful)."""

    def __init__(self, width: int = 2048, logits: int = 1008):
        super().__init__()
        self.proj = nn.Linear(3, width)
        self.logits = logits

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor:
        f = self.proj(x.to(torch.float32).mean(dim=(2, 3)) / 255.0)
        if return_features:
            return f
        return f[:, :self.logits]


TinyInception = TinyTorchScriptNet


def save_scripted(module: nn.Module, path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # torch.jit.script is deprecated, still works
        torch.jit.script(module).save(str(path))


def test_inception_loading_path(tmp_path):
    path = tmp_path / "inception-2015-12-05.pt"
    save_scripted(TinyInception(), path)
    ex = make_extractor("inception", weights_path=str(path))
    assert isinstance(ex, InceptionExtractor)
    assert ex.name == "inception-v3-2015-12-05" and ex.num_features == 2048
    grey = smooth_images(4, seed=0, channels=1)
    feats = ex(grey)
    assert feats.shape == (4, 2048)
    assert torch.equal(feats, ex(grey.repeat(1, 3, 1, 1)))
    assert not any(p.requires_grad for p in ex.parameters())
    real, fake = smooth_images(8, seed=0), smooth_images(8, seed=1)
    assert frechet_distance([real], [fake], ex) > 0

    wrong = tmp_path / "other.pt"
    save_scripted(TinyInception(width=16), wrong)
    with pytest.raises(ValueError, match="expected"):
        InceptionExtractor(wrong)(grey)


def test_inception_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "inception-2015-12-05.pt"
    with pytest.raises(FileNotFoundError, match="eval.inception_weights") as err:
        make_extractor("inception", weights_path=str(missing))
    assert str(missing) in str(err.value)
    with pytest.raises(FileNotFoundError, match="eval.inception_weights"):
        make_extractor("inception")


def test_unknown_extractor_lists_names():
    with pytest.raises(ValueError, match="inception.*randconv"):
        make_extractor("vgg")
