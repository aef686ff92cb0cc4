"""Paired image metrics behind `MetricSuite`: SSIM and PSNR agree with scikit-image, L1 / MSE by
hand, the perceptual distance, the change-mask F1, and the suite's interface."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from models.metrics.change import change_map
from models.metrics.extractors import RandConvExtractor
from models.metrics.fid import frechet_distance
from models.metrics.perceptual import PerceptualDistance
from models.metrics.suite import METRICS, MetricSuite


def images(n: int, channels: int, size: int = 48, seed: int = 0) -> torch.Tensor:
    """uint8 NCHW: smooth fields plus fine texture (SSIM sees structure at every scale)."""
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand(n, channels, 6, 6, generator=g), size=size, mode="bicubic", align_corners=False)
    fine = torch.rand(n, channels, size, size, generator=g) * 0.2
    return ((coarse * 0.8 + fine).clamp(0, 1) * 255).round().to(torch.uint8)


def distort(x: torch.Tensor, seed: int, amount: int = 30) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    blurred = F.avg_pool2d(x.float(), 3, 1, 1, count_include_pad=False)
    noise = torch.randint(-amount, amount + 1, x.shape, generator=g)
    return (blurred + noise).clamp(0, 255).round().to(torch.uint8)


def hwc(x: torch.Tensor, i: int) -> np.ndarray:
    return x[i].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("channels", [1, 3])
def test_ssim_and_psnr_agree_with_scikit_image(channels):
    real = images(6, channels, seed=1)
    fake = distort(real, seed=2)
    suite = MetricSuite(["ssim", "psnr"])
    suite.update(fake=fake[:4], real=real[:4])   # two batches: the suite averages over images
    suite.update(fake=fake[4:], real=real[4:])
    ours = suite.compute()
    # scikit-image with the Gaussian-window settings of Wang et al. (what torchmetrics implements).
    ssim_ref = np.mean([structural_similarity(hwc(real, i), hwc(fake, i), data_range=255, channel_axis=2,
                                              gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
                        for i in range(6)])
    psnr_ref = np.mean([peak_signal_noise_ratio(hwc(real, i), hwc(fake, i), data_range=255) for i in range(6)])
    assert 0.2 < ssim_ref < 0.95   # a real distortion, not a trivial case
    assert ours["ssim"] == pytest.approx(ssim_ref, abs=1e-4)
    assert ours["psnr"] == pytest.approx(psnr_ref, abs=1e-3)


def test_identical_images_and_ordering():
    real = images(4, 3, seed=3)
    same = MetricSuite(["ssim", "psnr", "l1", "mse", "perceptual_randconv"])
    same.update(fake=real, real=real)
    s = same.compute()
    assert s["ssim"] == pytest.approx(1.0, abs=1e-6) and s["l1"] == 0 and s["mse"] == 0 and s["perceptual_randconv"] == pytest.approx(0, abs=1e-6)
    assert s["psnr"] > 80   # torchmetrics clamps the zero error
    light, heavy = (MetricSuite(["ssim", "psnr", "perceptual_randconv"]) for _ in range(2))
    light.update(fake=distort(real, 0, amount=5), real=real)
    heavy.update(fake=distort(real, 0, amount=60), real=real)
    a, b = light.compute(), heavy.compute()
    assert a["ssim"] > b["ssim"] and a["psnr"] > b["psnr"] and 0 < a["perceptual_randconv"] < b["perceptual_randconv"]


def test_l1_and_mse_by_hand():
    real = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    fake = real.clone()
    fake[0, 0, 0, :2] = 255   # 2 of 32 pixels off by the full range
    suite = MetricSuite(["l1", "mse"])
    suite.update(fake=fake, real=real)
    assert suite.compute() == pytest.approx({"l1": 2 / 32, "mse": 2 / 32})


def test_perceptual_distance_structure():
    d = PerceptualDistance()
    x = images(3, 3, seed=4).float() / 127.5 - 1
    y = images(3, 3, seed=5).float() / 127.5 - 1
    dist = d(x, y)
    assert dist.shape == (3,) and (dist > 0).all()
    assert torch.allclose(d(x, x), torch.zeros(3), atol=1e-6)
    assert torch.allclose(d(x, y), d(y, x))
    grey = x[:, :1]
    assert torch.allclose(d(grey, y[:, :1]), d(grey.repeat(1, 3, 1, 1), y[:, :1].repeat(1, 3, 1, 1)))
    # Differentiable: usable as a training loss.
    x.requires_grad_(True)
    d(x, y).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in d.parameters())
    assert RandConvExtractor.name in d.name


def test_change_map_and_f1():
    past = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    real = past.clone()
    real[0, :, :2, :] = 200          # true change: the top half (8 pixels)
    fake = past.clone()
    fake[0, :, :1, :] = 200          # predicted: the top row (4 pixels, all right)
    fake[0, :, 3, :2] = 200          # and 2 wrong pixels
    fake[0, 0, 3, 3] = 60            # below the threshold when averaged over channels (20 < 25.5)
    assert change_map(past, real).sum() == 8 and change_map(past, fake).sum() == 6
    suite = MetricSuite(["f1"])
    suite.update(fake=fake, real=real, cond=past)
    tp, fp, fn = 4, 2, 4
    assert suite.compute()["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    with pytest.raises(ValueError, match="past image"):
        suite.update(fake=fake, real=real)


def test_suite_interface_and_params():
    ex = RandConvExtractor()
    real, fake = images(8, 3, seed=6), images(8, 3, seed=7)
    suite = MetricSuite(["fid", "ssim"], extractor=ex)
    suite.update(fake=fake[:5], real=real[:5])
    suite.update(fake=fake[5:], real=real[5:])
    out = suite.compute()
    assert out["fid"] == pytest.approx(frechet_distance([real], [fake], ex), rel=1e-5)
    params = suite.params()
    assert params["fid_extractor"] == ex.name and params["eval_metrics"] == "fid,ssim"
    assert params["eval_fake_images"] == params["eval_real_images"] == "8"
    # A distribution metric alone takes either side on its own.
    fid_only = MetricSuite(["fid"], extractor=ex)
    fid_only.update(real=real)
    fid_only.update(fake=fake)
    assert fid_only.compute()["fid"] == pytest.approx(out["fid"], rel=1e-5)
    # Paired metrics refuse lone sides and mismatched pairs; unknown names and bad dtypes are refused.
    with pytest.raises(ValueError, match="pairs"):
        suite.update(real=real)
    with pytest.raises(ValueError, match="pairs"):
        suite.update(fake=fake[:2], real=real)
    with pytest.raises(TypeError, match="uint8"):
        suite.update(fake=fake.float(), real=real)
    with pytest.raises(ValueError, match="unknown metrics"):
        MetricSuite(["fid", "iou"], extractor=ex)
    with pytest.raises(ValueError, match="extractor"):
        MetricSuite(["fid"])
    assert set(METRICS) == {"fid", "kid", "pr", "l1", "mse", "ssim", "psnr", "lpips", "perceptual_randconv", "f1"}


def test_metrics_never_synchronise_across_processes():
    """Evaluation runs on rank 0 only: a metric that all-gathers at compute() would hang the run."""
    suite = MetricSuite(METRICS, extractor=RandConvExtractor())   # without weights, lpips is perceptual_randconv
    assert len(suite.metrics()) == len(METRICS) - 1
    for metric in suite.metrics():
        assert metric.sync_on_compute is False and metric.dist_sync_on_step is False, type(metric).__name__
