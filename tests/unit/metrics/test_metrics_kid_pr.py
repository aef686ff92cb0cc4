"""KID and improved precision/recall: against brute force and hand-checked cases, inside the
metric suite, and the VGG-16 loading path (with a tiny stand-in network)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_shards.sources import Sample
from data_shards.writer import write_shards
from jobs.eval.core import EvalSettings, evaluate
from models.registry import make_family
from models.images import nchw_to_nhwc_numpy
from models.metrics.extractors import RandConvExtractor, VGG16Extractor
from models.metrics.kid import KernelDistance, kid_from_features
from models.metrics.precision_recall import PrecisionRecall, precision_recall_from_features
from models.metrics.suite import MetricSuite
from test_metrics_fid import TinyTorchScriptNet


def fed(metric, real, fake):
    """The metric's value for one batch of each side, fed on its own (not through the suite)."""
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return metric.compute()


def smooth_images(n: int, seed: int, channels: int = 3, size: int = 32) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, 4, 4, generator=g)
    return (F.interpolate(coarse, size=size, mode="bilinear", align_corners=False) * 255).round().to(torch.uint8)


def gaussian(n: int, d: int, seed: int, shift: float = 0.0) -> Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) + shift


# -- KID ---------------------------------------------------------------------------------------

def brute_force_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD², cubic kernel, written out pair by pair."""
    m, d = x.shape
    k = lambda a, b: (a @ b / d + 1) ** 3   # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_equals_brute_force_on_one_full_subset():
    real, fake = gaussian(40, 6, seed=0), gaussian(40, 6, seed=1, shift=0.3)
    # Subset size >= n: the one subset is a permutation of all features, which MMD² ignores.
    kid = kid_from_features(real, fake, subsets=1, subset_size=1000)
    assert kid == pytest.approx(brute_force_mmd2(fake.double().numpy(), real.double().numpy()), rel=1e-9)
    assert kid_from_features(real, fake, subsets=3, seed=5) == kid_from_features(real, fake, subsets=3, seed=5)


def test_kid_near_zero_on_itself_and_grows_with_shift():
    real = gaussian(300, 16, seed=0)
    same = kid_from_features(real, real, subsets=20, subset_size=100)
    other_draw = kid_from_features(real, gaussian(300, 16, seed=1), subsets=20, subset_size=100)
    shifted = kid_from_features(real, gaussian(300, 16, seed=1, shift=0.5), subsets=20, subset_size=100)
    far = kid_from_features(real, gaussian(300, 16, seed=1, shift=1.0), subsets=20, subset_size=100)
    # A set against itself is slightly negative: shared points inflate the cross term, which the
    # estimator assumes comes from independent samples (about -2·k(x, x)/m).
    assert abs(same) < 0.1 * shifted and abs(other_draw) < 0.01 * shifted
    assert 0 < shifted < far
    with pytest.raises(ValueError, match="at least 2"):
        kid_from_features(real, real[:1])


# -- precision / recall -------------------------------------------------------------------------

def test_precision_recall_tiny_2d_case():
    # k = 1, radii = distance to the nearest other point of the same set:
    # real radii 1, 1, 2, 2; fake radii 4.5, 4.5, 0.6, 0.6.
    real = torch.tensor([[0.0, 0], [1, 0], [10, 0], [12, 0]])
    fake = torch.tensor([[0.5, 0], [5, 0], [11, 0], [11.6, 0]])
    # Precision: (5, 0) is outside every real ball. Recall: (10, 0) is outside every fake ball.
    p, r = precision_recall_from_features(real, fake, k=1)
    assert (p, r) == (0.75, 0.75)
    p3, r3 = precision_recall_from_features(real, fake, k=3)   # the 3rd neighbour covers everything here
    assert (p3, r3) == (1.0, 1.0)


def test_precision_recall_identical_and_far_apart():
    real = gaussian(500, 32, seed=0)
    assert precision_recall_from_features(real, real.clone(), row_batch=64) == (1.0, 1.0)
    p, r = precision_recall_from_features(real, gaussian(500, 32, seed=1, shift=10.0), row_batch=64)
    assert p == 0 and r == 0
    # Half as spread out: inside the real manifold (precision high) yet covering little of it.
    p, r = precision_recall_from_features(real, 0.3 * gaussian(500, 32, seed=2))
    assert p > 0.9 and r < 0.5
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall_from_features(real, real[:3])


# -- VGG-16 loading path --------------------------------------------------------------------------

def TinyVGG() -> nn.Module:
    return TinyTorchScriptNet(width=4096, logits=1000)


@pytest.fixture(scope="module")
def vgg_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("vgg") / "vgg16.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)   # torch.jit.script is deprecated, still works
        torch.jit.save(torch.jit.script(TinyVGG()), str(path))
    return str(path)


def test_vgg_loading_path(vgg_path):
    ex = VGG16Extractor(vgg_path)
    grey = smooth_images(4, seed=0, channels=1)
    feats = ex(grey)
    assert feats.shape == (4, 4096) and ex.num_features == 4096
    assert torch.equal(feats, ex(grey.repeat(1, 3, 1, 1)))
    assert not any(p.requires_grad for p in ex.parameters())


def test_vgg_missing_file_names_the_file_and_spec_key(tmp_path):
    missing = tmp_path / "nowhere" / "vgg16.pt"
    with pytest.raises(FileNotFoundError, match="eval.vgg_weights") as err:
        VGG16Extractor(str(missing))
    assert str(missing) in str(err.value) and "vgg16.pt" in str(err.value)
    with pytest.raises(FileNotFoundError, match="no path was given"):
        VGG16Extractor(None)


# -- inside the suite and evaluate ----------------------------------------------------------------

def test_suite_computes_fid_kid_precision_recall():
    real = smooth_images(40, seed=0, channels=1)
    fake = smooth_images(40, seed=1, channels=1) // 2   # darker: a different distribution
    suite = MetricSuite(["fid", "kid", "pr"], extractor=RandConvExtractor())
    for b in real.split(16):
        suite.update(real=b)
    for b in fake.split(16):   # sides in separate calls, as for an unconditional family
        suite.update(fake=b)
    scores = suite.compute()
    assert set(scores) == {"fid", "kid", "precision", "recall"}
    assert all(np.isfinite(v) for v in scores.values()) and scores["fid"] > 0 and scores["kid"] > 0
    assert 0 <= scores["precision"] <= 1 and 0 <= scores["recall"] <= 1
    ex = RandConvExtractor()
    assert scores["kid"] == pytest.approx(fed(KernelDistance(ex), real, fake), rel=1e-6)
    assert scores["precision"] == fed(PrecisionRecall(ex), real, fake)["precision"]
    params = suite.params()
    assert params["kid_extractor"] == params["pr_extractor"] == RandConvExtractor.name
    assert params["kid_subset_size"] == "40" and params["pr_k"] == "3"

    same = MetricSuite(["kid", "pr"], extractor=RandConvExtractor())
    same.update(real=real, fake=real)
    s = same.compute()
    assert abs(s["kid"]) < 0.1 * scores["kid"] and s["precision"] == s["recall"] == 1.0


def test_suite_pr_in_vgg_space_and_needs_an_extractor(vgg_path):
    suite = MetricSuite(["pr"], pr_extractor=VGG16Extractor(vgg_path))
    suite.update(real=smooth_images(8, seed=0), fake=smooth_images(8, seed=1))
    assert set(suite.compute()) == {"precision", "recall"}
    assert suite.params()["pr_extractor"] == VGG16Extractor.name
    with pytest.raises(ValueError, match="kid needs a feature extractor"):
        MetricSuite(["kid"])
    with pytest.raises(ValueError, match="pr needs a feature extractor"):
        MetricSuite(["pr"])


def test_evaluate_builds_the_pr_extractor(tmp_path, vgg_path):
    images = nchw_to_nhwc_numpy(smooth_images(10, seed=0, size=16))
    url = str(tmp_path / "set")
    write_shards([Sample(key=f"s{i}", image=images[i]) for i in range(10)], url, layout="test", resolution=16,
                 channels=3, source="test", shard_samples=5, progress=False)
    fam = make_family("dcgan", {"ngf": 8, "ndf": 8, "nz": 8}, resolution=16, channels=3, lr=2e-4)
    fam.metrics = ("fid", "kid", "pr")
    torch.manual_seed(0)
    G = fam.build()["G"]

    def run(**kw):
        return evaluate(fam, G, EvalSettings(num_samples=10, batch=5, **kw), data_url=url, device=torch.device("cpu"))

    scores, params = run()
    assert set(scores) == {"fid", "kid", "precision", "recall"}
    assert params["pr_extractor"] == params["kid_extractor"] == RandConvExtractor.name
    scores, params = run(vgg_weights=vgg_path)
    assert params["pr_extractor"] == VGG16Extractor.name and params["fid_extractor"] == RandConvExtractor.name
    fam.metrics = ("pr",)   # pr in VGG space alone needs no FID extractor: a missing Inception file is fine
    _, params = evaluate(fam, G, EvalSettings(num_samples=10, extractor="inception", batch=5, vgg_weights=vgg_path),
                         data_url=url, device=torch.device("cpu"))
    assert params["pr_extractor"] == VGG16Extractor.name
