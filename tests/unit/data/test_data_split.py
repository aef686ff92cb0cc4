"""The held-out split (`data.holdout`): chosen by key, the same whatever the shards' layout; the
training stream never yields it and keeps its guarantees for the rest; evaluation draws."""
from __future__ import annotations

from collections import Counter

import pytest
from shard_helpers import crater_keys, stream_keys, write_craters

from data_shards.split import evaluation_positions, held_out_keys, holdout_split, key_hash, shard_keys
from data_shards.stream import batches_per_epoch, image_stream, iterate_once
from data_shards.synthetic import crater_field
from data_shards.writer import write_shards

N = 64


def flat(batches):
    return [k for b in batches for k in b]


def split_keys(url, holdout) -> tuple[set[str], set[str]]:
    """(training keys, held-out keys) of the set at `url`."""
    keys = shard_keys(url)
    split = holdout_split(url, holdout)
    named = [{keys[s][i] for s, idx in enumerate(side) for i in idx} for side in (split.training, split.held_out)]
    return named[0], named[1]


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """64 samples in 8 shards of unequal size (7 x 9 + 1)."""
    dest = tmp_path_factory.mktemp("uneven") / "set"
    write_craters(dest, count=N, shard_samples=9, resolution=8)
    return str(dest)


@pytest.mark.parametrize("holdout", [0.2, 11])
def test_the_split_follows_the_keys_not_the_shards_or_their_order(tmp_path, holdout):
    samples = list(crater_field(N, 8, 1, 0))
    sets = []
    for name, shard_samples, order in (("a", 9, samples), ("b", 25, samples), ("c", 4, samples[::-1])):
        write_shards(order, str(tmp_path / name), layout="synthetic:craters", resolution=8, channels=1,
                     source="test", shard_samples=shard_samples, progress=False)
        sets.append(split_keys(str(tmp_path / name), holdout))
    training, held = sets[0]
    assert all(s == (training, held) for s in sets[1:])   # same keys held out, however sharded or ordered
    assert training | held == set(crater_keys(N)) and not training & held
    first_keys_by_position = set(crater_keys(len(held)))
    assert held != first_keys_by_position and held != set(crater_keys(N)[-len(held):])   # not "the first/last N"


def test_a_fraction_holds_out_about_that_share_and_a_count_exactly_that_many():
    keys = [f"sample-{i}" for i in range(20_000)]
    assert 1_850 < len(held_out_keys(keys, 0.1)) < 2_150
    assert len(held_out_keys(keys, 137)) == 137
    # A count holds out the keys with the smallest hashes, so a larger count holds out a superset.
    assert held_out_keys(keys, 50) < held_out_keys(keys, 137)
    # A fraction decides key by key: adding samples never moves an old one to the other side.
    assert held_out_keys(keys[:5_000], 0.1) == held_out_keys(keys, 0.1) & set(keys[:5_000])
    assert held_out_keys(keys, None) == set()
    assert 0 <= key_hash("x") < 1 and key_hash("x") == key_hash("x") != key_hash("y")


@pytest.mark.parametrize("bad", [0, 1, 0.0, 1.0, 1.5, -3, True, "10%"])
def test_bad_holdout_values_name_the_field(bad):
    with pytest.raises(ValueError, match="data.holdout"):
        held_out_keys(["a", "b"], bad)


def test_a_split_with_an_empty_side_is_refused_with_the_sizes(tmp_path):
    dest = tmp_path / "few"
    write_craters(dest, count=4, shard_samples=4, resolution=8)
    assert not held_out_keys(crater_keys(4), 0.01)   # this fraction holds out none of these keys
    with pytest.raises(ValueError, match=r"data.holdout=0.01 holds out 0 of the 4 samples"):
        holdout_split(str(dest), 0.01)
    assert len(held_out_keys(crater_keys(4), 0.2)) == 1
    with pytest.raises(ValueError, match=r"data.holdout=0.2 holds out 1 of the 4 samples .* evaluation 2"):
        holdout_split(str(dest), 0.2)   # too few to score a distribution (FID) on
    assert holdout_split(str(dest), 2).sizes == (2, 2)
    with pytest.raises(ValueError, match=r"data.holdout=4 holds out all of the 4 samples"):
        holdout_split(str(dest), 4)


@pytest.mark.parametrize("workers", [0, 2])
def test_training_never_sees_held_out_samples_and_sees_every_other_once_per_epoch(uneven, workers):
    training, held = split_keys(uneven, 8)
    assert len(held) == 8
    # 56 training samples, 2 ranks x batch 4: 7 batches per rank per epoch, nothing left over.
    assert batches_per_epoch(uneven, 2, 4, holdout=8) == 7 and batches_per_epoch(uneven, 2, 4) == 8
    keys = stream_keys(uneven, world_size=2, num_workers=workers, batch_size=4, batches=21, holdout=8)
    assert all(len(b) == 4 for r in keys for b in keys[r])
    for e in range(3):
        epoch = Counter(flat(keys[0][e * 7:(e + 1) * 7]) + flat(keys[1][e * 7:(e + 1) * 7]))
        assert set(epoch) == training and set(epoch.values()) == {1}, e


def test_a_fraction_leaves_a_remainder_for_later_epochs_but_never_a_held_out_key(uneven):
    training, held = split_keys(uneven, 0.25)
    per_epoch = batches_per_epoch(uneven, 2, 3, holdout=0.25)
    assert per_epoch == len(training) // 6 and held
    keys = stream_keys(uneven, world_size=2, num_workers=1, batch_size=3, batches=3 * per_epoch, holdout=0.25)
    for e in range(3):
        epoch = flat(keys[0][e * per_epoch:(e + 1) * per_epoch]) + flat(keys[1][e * per_epoch:(e + 1) * per_epoch])
        assert len(epoch) == len(set(epoch)) == per_epoch * 6 and set(epoch) <= training


def test_a_holdout_too_large_for_the_ranks_names_data_holdout_and_the_sizes(tmp_path):
    dest = tmp_path / "small"
    write_craters(dest, count=10, shard_samples=5, resolution=8)
    with pytest.raises(ValueError, match=r"6 samples \(4 more held out by data.holdout=4\) cannot fill a batch "
                                         r"of 4 on each of 2 ranks"):
        image_stream(str(dest), rank=0, world_size=2, batch_size=4, seed=0, holdout=4)
    image_stream(str(dest), rank=0, world_size=2, batch_size=4, seed=0)   # fits without the holdout


def test_evaluation_draws_are_seeded_and_come_from_the_held_out_split(uneven):
    keys = shard_keys(uneven)

    def named(positions):
        return [keys[s][i] for s, idx in enumerate(positions) for i in idx]

    whole = named(evaluation_positions(uneven, 20, seed=0))
    assert whole == named(evaluation_positions(uneven, 20, seed=0))   # the same on every call
    assert len(set(whole)) == 20 and set(whole) != set(crater_keys(20))   # not the first 20
    assert set(whole) != set(named(evaluation_positions(uneven, 20, seed=1)))
    _, held = split_keys(uneven, 0.25)
    assert set(named(evaluation_positions(uneven, 1000, seed=0, holdout=0.25))) == held   # all of it, when it fits
    some = named(evaluation_positions(uneven, 3, seed=0, holdout=0.25))
    assert len(some) == 3 and set(some) <= held
    # The ordered pass reads exactly the drawn samples, in manifest order.
    read = flat(b["__key__"] for b in iterate_once(uneven, batch_size=7, positions=evaluation_positions(uneven, 20, 0)))
    assert read == sorted(whole)
