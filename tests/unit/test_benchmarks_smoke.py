"""The MineAug benchmarks' own pieces (issue 23): what their tables are computed with.

The scripts' full runs take minutes (`benchmarks/mineaug_value.py --quick` trains ten proxy GANs on
Ray Tune), so they are not run here; these check what would make their figures wrong without
failing: the interval and paired-difference formulas against scipy's own t-test, the real-image
set's tiles, Inception-v3's architecture by its published parameter count and its file's interface,
and the parallel-efficiency ratios against numbers worked by hand.
"""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def value():
    yield _load("mineaug_value")
    sys.modules.pop("mineaug_value", None)


@pytest.fixture(scope="module")
def search_bench():
    yield _load("mineaug_search")
    sys.modules.pop("mineaug_search", None)


def test_t_interval_matches_scipys_t_test(value):
    from scipy.stats import ttest_1samp

    rng = np.random.default_rng(3)
    for n in (2, 3, 5, 9):
        x = rng.normal(4.0, 2.0, n)
        iv = value.t_interval(x, 0.95)
        ci = ttest_1samp(x, 0.0).confidence_interval(0.95)
        assert (iv.mean, iv.low, iv.high, iv.n) == pytest.approx((x.mean(), ci.low, ci.high, n), rel=1e-12)
    # Worked by hand: [1..5], mean 3, s = sqrt(2.5), t(0.975, 4) = 2.776445
    iv = value.t_interval([1, 2, 3, 4, 5])
    assert iv.high - iv.mean == pytest.approx(2.776445 * math.sqrt(2.5) / math.sqrt(5), rel=1e-6)
    one = value.t_interval([7.0])
    assert one.mean == 7.0 and one.n == 1 and math.isnan(one.low) and one.show() == "7 (n/a)"
    assert value.t_interval([]).n == 0


def test_paired_difference_is_taken_seed_by_seed(value):
    from scipy.stats import ttest_rel

    arm = {0: 5.0, 1: 4.0, 2: 6.5, 3: 5.5, 9: 1.0}      # seed 9 has no partner: left out
    base = {0: 5.5, 1: 4.8, 2: 6.6, 3: 6.4, 4: 3.0}
    iv = value.paired(arm, base)
    seeds = [0, 1, 2, 3]
    ci = ttest_rel([arm[s] for s in seeds], [base[s] for s in seeds]).confidence_interval(0.95)
    assert (iv.n, iv.low, iv.high) == (4, pytest.approx(ci.low), pytest.approx(ci.high))
    assert iv.mean == pytest.approx(np.mean([-0.5, -0.8, -0.1, -0.9]))
    assert value.significant(iv) == "better"
    only = value.paired(arm, base, seeds=[1, 2])
    assert only.n == 2 and only.mean == pytest.approx(-0.45)
    assert value.significant(value.t_interval([-1.0, 2.0, 0.5])) == "no difference shown"
    assert value.significant(value.t_interval([1.0, 1.1, 0.9])) == "worse"
    assert value.significant(value.t_interval([1.0])) == "no interval"


def test_real_image_tiles_are_whole_disjoint_crops(value):
    import skimage.data

    tiles = value.skimage_tiles()
    assert len(tiles) == 6 * 8 * 8                                  # six 512² images, 64² tiles
    assert all(t.shape == (64, 64) and t.dtype == np.uint8 for t in tiles.values())
    np.testing.assert_array_equal(tiles["moon_03_05"], skimage.data.moon()[192:256, 320:384])
    # the grey astronaut is a real grey image, not one channel of the colour one
    assert not np.array_equal(tiles["astronaut_00_00"], skimage.data.astronaut()[:64, :64, 0])


def test_random_inception_has_inception_v3s_architecture(search_bench, tmp_path):
    from models.metrics.extractors import make_extractor

    net = search_bench.RandomInceptionV3()
    # Inception-v3 has 23,834,568 parameters with its 1000-way classifier (2048·1000 + 1000) and no
    # auxiliary head: the feature network is the rest.
    assert sum(p.numel() for p in net.parameters()) == 23_834_568 - (2048 * 1000 + 1000)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == 94
    path = search_bench.random_inception_file(str(tmp_path / "inception.pt"))
    extractor = make_extractor("inception", path)   # the project's loader takes it as NVIDIA's file
    with torch.no_grad():
        feats = extractor(torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8))
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
    assert 1e-3 < float(feats.std()) < 1e3   # He initialisation: no vanishing activations (denormals)


def test_parallel_ratios_and_stage1_wall(search_bench):
    # 2 slots, 10 s of wall, trials of 4 + 5 + 6 + 3 = 18 s: the slots are busy 18/20 of the time.
    ratio, efficiency = search_bench.parallel_ratios(10.0, [4.0, 5.0, 6.0, 3.0], 2)
    assert ratio == pytest.approx(10.0 / 9.0) and efficiency == pytest.approx(1.8)
    marks = [(1.0, "originals: 8 images"), (2.0, "stage 1: 26 trial(s), up to 2 at once, {}"),
             (3.5, "  [ 1/26] Rotate  FID 1 ± 0"), (9.25, "  [26/26] Invert  FID 2 ± 0"),
             (11.0, "ranked 10 3-subsets")]
    assert search_bench.stage1_wall(marks) == pytest.approx(7.25)


def test_held_arrays_at_the_papers_scale(search_bench):
    held = search_bench.held_bytes(2500, 256, 26, 3)
    assert held["originals' pixels"] == 2500 * 65536                       # uint8, one channel
    assert held["every candidate's features, all repeats"] == 1_597_440_000   # 78 sets of 2500 × 2048 float32
    assert held["mixture table, r × r per candidate and repeat"] == 78 * 2048 ** 2 * 8   # r = 2048 < 2499
    assert search_bench.held_bytes(16, 256, 26, 3)["mixture table, r × r per candidate and repeat"] == 78 * 15 ** 2 * 8


def test_arms_are_read_from_the_searchs_own_runs(value):
    from types import SimpleNamespace as NS

    def run(key, seed, fid, role="proposal", status="finished"):
        return NS(key=key, seed=seed, fid=fid, kid=fid / 100, role=role, status=status)

    runs = [run("none", s, 1.0, "control") for s in (0, 1, 2)] + [run("trivial", s, 1.1, "control") for s in (0, 1, 2)]
    runs += [run("B+A", s, 0.9, "control") for s in (0, 1, 2)]
    # The confirmed proposal (every seed) is stage 2's pick, though another did better at seed 0 alone,
    # and a stopped one (no final FID) never counts.
    runs += [run("C", s, 0.8) for s in (0, 1, 2)] + [run("D", 0, 0.5), run("E", 0, 0.1, status="stopped")]
    result = NS(validation=NS(runs=runs), singles=["A", "B"], best_set=["B", "A"],
                ranking=[NS(augmentation=n, kept=n != "X") for n in ("B", "X", "A", "C", "D")])
    arms = value.arm_runs(result)
    assert arms["singles"][0] == arms["best set"][0] == "B+A"   # in kept order, as the search keys it
    assert arms["winner"][0] == "C" and arms["winner"][1] == {0: 0.8, 1: 0.8, 2: 0.8}
    assert arms["none"][2] == {0: 0.01, 1: 0.01, 2: 0.01}
