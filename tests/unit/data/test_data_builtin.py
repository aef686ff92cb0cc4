"""Built-in synthetic sets: names, keys, channels, determinism, pairing, built once."""
from __future__ import annotations

import numpy as np
import pytest

from data_shards import builtin
from data_shards.card import read_card
from data_shards.landscape import CLASSES, growth_series
from data_shards.stream import iterate_once
from data_shards.synthetic import FIELD, LARGE, MAX_CRATERS, _params, crater_field

SETS = {  # name -> (modalities, stream keys)
    "craters": (["image", "json"], ("image",)),
    "craters-large": (["image", "json"], ("image",)),
    "terrain-classes": (["image", "cls", "json"], ("image", "cls")),
    "maps": (["image", "cond", "json"], ("cond", "image")),
    "timeseries": (["image", "cond", "mask", "json"], ("cond", "mask", "image", "json")),
    "sat2ground": (["image", "cond", "json"], ("cond", "image")),
}


def test_crater_field_is_deterministic_per_image():
    a = [s.image.tobytes() for s in crater_field(5, 32, seed=3)]
    b = [s.image.tobytes() for s in crater_field(300, 32, seed=3)][:5]  # rendered in other chunks
    c = [s.image.tobytes() for s in crater_field(5, 32, seed=4)]
    assert a == b
    assert all(x != y for x, y in zip(a, c))
    assert len(set(a)) == 5
    s = next(crater_field(1, 32, channels=3, seed=3))
    assert s.key == "crater-000000" and s.image.shape == (32, 32, 3) and s.image.dtype == np.uint8
    assert s.image.std() > 5  # not a flat image


def test_crater_field_bytes_are_those_of_every_earlier_release():
    # Fingerprints of users' built-in sets (and of every run's data tag) depend on these bytes:
    # the digest was taken from the generator before crater styles existed.
    import hashlib
    digest = hashlib.sha256(b"".join(s.image.tobytes() for s in crater_field(6, 32, 1, 0))).hexdigest()
    assert digest == "63f8721bceb54bbec6f84506959fddb7f8f84a606df2f6507f316ef597ea07e4"
    assert "style" not in next(crater_field(1, 16)).meta


def test_large_craters_are_few_big_and_lit_by_one_sun():
    field = [_params(0, i, FIELD) for i in range(50)]
    large = [_params(0, i, LARGE) for i in range(50)]
    for p in large:
        r = p["radii"][p["radii"] > 0]
        assert LARGE.craters[0] <= len(r) <= LARGE.craters[1]
        assert (r >= LARGE.radii[0] - 1e-12).all() and (r <= LARGE.radii[1] + 1e-12).all()
    assert len({p["sun"] for p in large}) == 1 and len({p["sun"] for p in field}) == 50
    az, el = np.degrees(np.arctan2(large[0]["sun"][1], large[0]["sun"][0])), np.degrees(np.arcsin(large[0]["sun"][2]))
    assert (round(float(az), 6), round(float(el), 6)) == LARGE.sun
    # At 32 px the median crater of LARGE spans pixels; FIELD's is about one pixel.
    median = lambda ps: np.median(np.concatenate([p["radii"][p["radii"] > 0] for p in ps])) * 32
    assert median(large) > 2.5 and median(field) < 0.5
    assert all(np.count_nonzero(p["radii"]) >= 32 for p in field) and MAX_CRATERS == 64
    assert next(crater_field(1, 16, style=LARGE)).meta["style"] == "large"


@pytest.mark.parametrize("channels", [1, 3])
def test_every_builtin_set_builds_with_its_keys(tmp_path, channels):
    fingerprints = set()
    for name, (modalities, keys) in SETS.items():
        url = builtin.ensure_builtin(f"builtin:{name}?count=10&seed=1", str(tmp_path), 16, channels)
        card = read_card(url)
        assert (card.layout, card.modalities, card.count, card.channels, card.resolution) == \
            (f"synthetic:{name}", modalities, 10, channels, 16)
        assert card.classes == (list(CLASSES) if name == "terrain-classes" else None)
        batch = next(iterate_once(url, batch_size=10, keys=keys))
        for k in keys:
            if k in ("image", "cond"):
                assert tuple(batch[k].shape) == (10, channels, 16, 16)
                assert batch[k].float().std() > 5  # not flat
        if "mask" in keys:
            assert tuple(batch["mask"].shape) == (10, 1, 16, 16)
            assert set(batch["mask"].unique().tolist()) <= {0, 255}
        if "cls" in keys:
            assert batch["cls"].tolist() == [i % len(CLASSES) for i in range(10)]
        fingerprints.add(card.fingerprint)
    assert len(fingerprints) == len(SETS)  # each set its own scenes


def test_builtin_sets_are_deterministic_and_seeded(tmp_path):
    for name in SETS:
        a = builtin.ensure_builtin(f"builtin:{name}?count=6&seed=2", str(tmp_path / "a"), 24, 3)
        b = builtin.ensure_builtin(f"builtin:{name}?count=6&seed=2", str(tmp_path / "b"), 24, 3)
        c = builtin.ensure_builtin(f"builtin:{name}?count=6&seed=3", str(tmp_path / "a"), 24, 3)
        assert read_card(a).fingerprint == read_card(b).fingerprint != read_card(c).fingerprint, name


def test_timeseries_mask_marks_the_growth():
    for s in growth_series(6, 64, channels=3, seed=0):
        grown = s.mask[:, :, 0] > 0
        assert s.meta["past_date"] < s.meta["future_date"] and s.meta["id"] == s.key
        if grown.sum() < 20:
            continue
        change = np.abs(s.image.astype(int) - s.cond.astype(int)).sum(axis=2)
        assert change[grown].mean() > 3 * change[~grown].mean()  # the mask is where the image changed


def test_pairs_show_the_same_scene(tmp_path):
    url = builtin.ensure_builtin("builtin:sat2ground?count=8&seed=0", str(tmp_path), 32, 3)
    b = next(iterate_once(url, batch_size=8, keys=("cond", "image")))
    sky = b["image"][:, :, :4].float()  # top rows of the ground view
    assert (sky[:, 2] > sky[:, 0] + 40).all()  # blue sky above the horizon
    url = builtin.ensure_builtin("builtin:maps?count=8&seed=0", str(tmp_path), 32, 3)
    b = next(iterate_once(url, batch_size=8, keys=("cond", "image")))
    water_on_map = (b["image"][:, 0] == 170) & (b["image"][:, 1] == 211) & (b["image"][:, 2] == 223)
    blue_on_satellite = b["cond"][:, 2].float() > b["cond"][:, 0].float() + 20
    assert water_on_map.sum() > 50 and (blue_on_satellite[water_on_map]).float().mean() > 0.9


def test_builtin_is_built_once(tmp_path, monkeypatch):
    url = "builtin:craters?count=20&seed=2"
    assert builtin.is_builtin(url) and not builtin.is_builtin(str(tmp_path))
    first = builtin.ensure_builtin(url, str(tmp_path), 16, 3, shard_samples=8)
    assert first == f"file://{tmp_path}/craters-n20-s2-r16-c3"
    card = read_card(first)
    assert (card.count, card.channels, card.shards, card.layout) == (20, 3, 3, "synthetic:craters")

    def no_rebuild(*a, **k):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(builtin, "write_shards", no_rebuild)
    assert builtin.ensure_builtin(url, str(tmp_path), 16, 3, shard_samples=8) == first
    for bad in ("builtin:moons", "builtin:craters?cnt=5", "builtin:maps?count=x", "builtin:timeseries?count=0"):
        with pytest.raises(ValueError, match="builtin:terrain-classes") as e:
            builtin.ensure_builtin(bad, str(tmp_path), 16, 3)
        assert bad.split("?")[0] in str(e.value) or "out of range" in str(e.value)
    with pytest.raises(ValueError, match="1 or 3 channels, not 4"):
        builtin.ensure_builtin("builtin:maps?count=2", str(tmp_path / "x"), 16, 4)
