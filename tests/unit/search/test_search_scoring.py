"""One candidate's scores (FID, MSE per repeat) against independent computations, and the
selection rules on the built-in crater set."""
import zlib

import numpy as np
import pytest
import torch

from data_shards.synthetic import crater_field
from models.augment.pool import apply_uint8
from models.metrics.extractors import make_extractor
from models.metrics.fid import frechet_distance
from search.frechet import Reference
from search.originals import from_tensors
from search.scoring import repeat_seed, score_candidate
from search.select import (best_singles, mixture_fid, mixture_table, near_duplicate_groups, rank_candidates,
                           rank_subsets)


def craters(n, res, channels=1):
    samples = list(crater_field(n, res, channels, seed=0))
    images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).contiguous()
    return images, [s.key for s in samples]


@pytest.fixture(scope="module")
def small():
    images, keys = craters(48, 32)
    return from_tensors(images, keys, "randconv")


@pytest.fixture(scope="module")
def crater_scores():
    """The built-in crater set at 32², as the search sees it (512 images, randconv, 3 repeats)."""
    torch.set_num_threads(2)
    images, keys = craters(512, 32)
    originals = from_tensors(images, keys, "randconv")
    ref, ex = Reference(originals.features), make_extractor("randconv")
    names = ["Rotate", "RandomAffine", "HorizontalFlip", "VerticalFlip", "Invert", "Shear", "Translation_x"]
    return originals, ref, {n: score_candidate(n, originals, ex, 3, 0, ref) for n in names}


def test_seed_is_a_stable_hash():
    assert repeat_seed(0, "Rotate", 1) == zlib.crc32(b"mineaug/0/Rotate/1")
    assert len({repeat_seed(s, n, r) for s in (0, 1) for n in ("Rotate", "Invert") for r in range(3)}) == 12


def test_fid_and_mse_match_independent_computations(small):
    ex = make_extractor("randconv")
    score = score_candidate("Rotate", small, ex, 2, 7)
    assert len(score.features) == 2 and score.features[0].shape == (48, 64)
    for r in range(2):
        aug = apply_uint8("Rotate", small.images, 1, repeat_seed(7, "Rotate", r))
        # FID: torchmetrics on the images themselves (its own extraction), not our cached statistics.
        assert score.fids[r] == pytest.approx(frechet_distance([small.images], [aug], ex), rel=1e-5)
        # MSE: per-image mean of squared differences in [-1, 1], in numpy.
        a = small.images.numpy().astype(np.float64) / 127.5 - 1
        b = aug.numpy().astype(np.float64) / 127.5 - 1
        assert score.mses[r] == pytest.approx(((a - b) ** 2).reshape(48, -1).mean(1).mean(), rel=1e-6)
    assert score.fid == pytest.approx(np.mean(score.fids)) and score.fid_std == pytest.approx(np.std(score.fids, ddof=1))


def test_same_seed_same_numbers_other_seed_other_draws(small):
    ex = make_extractor("randconv")
    a = score_candidate("Translation_x", small, ex, 2, 0)
    b = score_candidate("Translation_x", small, ex, 2, 0)
    c = score_candidate("Translation_x", small, ex, 2, 1)
    assert a.fids == b.fids and a.mses == b.mses
    assert a.fids != c.fids


def test_crater_set_rules(crater_scores):
    originals, ref, scores = crater_scores
    rows = {r.augmentation: r for r in rank_candidates(scores, 0.02, dedupe=True)}
    # A near-identity transform (Shear in degrees moves pixels by < 1 pixel) is filtered by MSE.
    assert not rows["Shear"].kept and "mse_min" in rows["Shear"].reason
    # Rotate and RandomAffine (the same rotation) form one group; only the better one stays.
    pair = {"Rotate", "RandomAffine"}
    member = next(n for n in pair if rows[n].near_duplicate_of)
    assert rows[member].near_duplicate_of == (pair - {member}).pop() and not rows[member].kept
    # Flips in different directions are different transforms.
    assert not rows["HorizontalFlip"].near_duplicate_of and not rows["VerticalFlip"].near_duplicate_of
    assert rows["HorizontalFlip"].kept and rows["VerticalFlip"].kept
    # Invert keeps no crater's shading: it ranks below both flips.
    assert rows["Invert"].rank > max(rows["HorizontalFlip"].rank, rows["VerticalFlip"].rank)
    ranked = sorted(rows.values(), key=lambda r: r.rank)
    kept = [r for r in ranked if r.kept]
    assert [r.fid for r in kept] == sorted(r.fid for r in kept)
    # dedupe off: the group is still reported, but both stay eligible.
    loose = {r.augmentation: r for r in rank_candidates(scores, 0.02, dedupe=False)}
    assert loose["Rotate"].kept and loose["RandomAffine"].kept and (loose["Rotate"].near_duplicate_of or loose["RandomAffine"].near_duplicate_of)


def test_ties_mark_overlapping_intervals(crater_scores):
    _, _, scores = crater_scores
    rows = rank_candidates(scores, 0.02, dedupe=True)
    for r in rows:
        for o in rows:
            if r.kept and o.kept and o is not r:
                overlap = abs(r.fid - o.fid) <= r.fid_std + o.fid_std
                assert (o.augmentation in r.tied_with) == overlap


def test_subset_ranking_is_the_brute_force_mixture_ranking(crater_scores):
    originals, ref, scores = crater_scores
    rows = rank_candidates(scores, 0.02, dedupe=True)
    kept = [r.augmentation for r in rows if r.kept]
    table = mixture_table(ref, scores, kept)
    subsets = rank_subsets(table, kept, 2)
    assert len(subsets) == len(kept) * (len(kept) - 1) // 2
    # Independent: concatenate the features and run torchmetrics' FID, repeat by repeat.
    from models.metrics.fid import FrechetDistance
    direct = {}
    for s in subsets:
        fids = []
        for r in range(3):
            m = FrechetDistance(make_extractor("randconv"))
            m.update_features(torch.from_numpy(originals.features), real=True)
            mix = np.concatenate([originals.features] + [scores[n].features[r] for n in s.augmentations])
            m.update_features(torch.from_numpy(mix), real=False)
            fids.append(m.compute())
        direct[s.augmentations] = np.mean(fids)
        assert s.fid == pytest.approx(direct[s.augmentations], rel=1e-5)
    assert [s.augmentations for s in subsets] == sorted(direct, key=direct.get)
    singles = best_singles(rows, 2)
    assert mixture_fid(table, kept, singles)[0] == pytest.approx(direct[tuple(n for n in kept if n in singles)], rel=1e-5)


def test_k_larger_than_kept_names_search_k(crater_scores):
    _, ref, scores = crater_scores
    table = mixture_table(ref, scores, ["Rotate", "Invert"])
    with pytest.raises(ValueError, match=r"search\.k=3 is larger than the 2 kept"):
        rank_subsets(table, ["Rotate", "Invert"], 3)


def test_identical_deterministic_outputs_group(crater_scores):
    _, _, scores = crater_scores
    import copy
    twin = copy.deepcopy(scores["HorizontalFlip"])
    twin.name = "HorizontalFlipTwin"
    groups = near_duplicate_groups({**scores, "HorizontalFlipTwin": twin}, ["HorizontalFlip", "HorizontalFlipTwin", "VerticalFlip"])
    assert list(groups.values()) == ["HorizontalFlip"] or list(groups.values()) == ["HorizontalFlipTwin"]


def test_a_nan_fid_is_never_kept_nor_ranked_first(crater_scores):
    _, _, scores = crater_scores
    import copy
    broken = copy.deepcopy(scores["HorizontalFlip"])
    broken.name, broken.fids = "Broken", [float("nan")] * len(broken.fids)
    assert np.isnan(broken.fid)
    rows = rank_candidates({**scores, "Broken": broken}, 0.02, dedupe=True)
    row = next(r for r in rows if r.augmentation == "Broken")
    assert not row.kept and "not finite" in row.reason and rows[-1] is row
    assert [r.augmentation for r in rows if r.kept] == [r.augmentation for r in rank_candidates(scores, 0.02, True)
                                                        if r.kept]
