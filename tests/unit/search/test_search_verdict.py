"""The verdict's statistics against independent computations: the paired bootstrap (NumPy, by
hand), Holm's step-down, and the plain-words verdict when nothing beats none."""
import numpy as np
import pytest

from search.validate import ValidatedRun, decide
from search.verdict import bootstrap_pvalue, compare_with_none, paired_interval


def by_hand_interval(diffs, level, resamples, seed):
    """The same percentile bootstrap, written out with a loop over resamples."""
    rng = np.random.default_rng(seed)
    d = np.asarray(diffs, dtype=float)
    idx = rng.integers(0, len(d), size=(resamples, len(d)))
    means = np.empty(resamples)
    for b in range(resamples):
        means[b] = sum(d[j] for j in idx[b]) / len(d)
    means.sort()
    tail = (1 - level) / 2

    def q(p):   # numpy's default ("linear") quantile, written out
        h = (resamples - 1) * p
        lo = int(np.floor(h))
        return means[lo] + (h - lo) * (means[min(lo + 1, resamples - 1)] - means[lo])
    return float(np.mean(d)), q(tail), q(1 - tail)


@pytest.mark.parametrize("diffs", [[-1.0, -2.5, -0.3], [0.4, -1.2, 0.9, -0.1, 2.0], [-3.0]])
def test_paired_interval_matches_numpy_by_hand(diffs):
    iv = paired_interval(diffs, level=0.9, resamples=2000, seed=7)
    mean, lo, hi = by_hand_interval(diffs, 0.9, 2000, 7)
    assert iv.mean == pytest.approx(mean, abs=1e-12)
    assert iv.low == pytest.approx(lo, abs=1e-12) and iv.high == pytest.approx(hi, abs=1e-12)


def test_pvalue_is_twice_the_smaller_tail():
    d = [0.5, -1.0, 0.2, 0.1]
    rng = np.random.default_rng(3)
    means = np.asarray(d)[rng.integers(0, 4, (5000, 4))].mean(1)
    want = min(1.0, 2 * min((means >= 0).mean(), (means <= 0).mean()))
    assert bootstrap_pvalue(d, resamples=5000, seed=3) == pytest.approx(want)


def test_holm_levels_and_step_down():
    none = {0: 10.0, 1: 11.0, 2: 10.5}
    fids = {"A": {0: 8.0, 1: 9.0, 2: 8.4},        # better at every seed
            "B": {0: 9.9, 1: 11.5, 2: 10.0},      # mixed
            "C": {0: 12.0, 1: 13.0, 2: 12.2}}     # worse at every seed
    out = compare_with_none(fids, none, {"A": "a"}, alpha=0.05, resamples=4000, seed=0)
    assert len(out) == 3
    # Holm: ordered by p-value, the j-th of m judged at 1 - alpha/(m - j).
    assert [c.level for c in out] == pytest.approx([1 - 0.05 / 3, 1 - 0.05 / 2, 1 - 0.05])
    assert [c.pvalue for c in out] == sorted(c.pvalue for c in out)
    got = {c.key: c for c in out}
    assert got["A"].beats_none and not got["B"].beats_none and not got["C"].beats_none
    assert got["A"].diffs == pytest.approx([-2.0, -2.0, -2.1]) and got["A"].label == "a"
    iv = paired_interval(got["A"].diffs, level=got["A"].level, resamples=4000, seed=0)
    assert (got["A"].low, got["A"].high) == (iv.low, iv.high)


def test_step_down_stops_at_the_first_failure():
    # B's interval alone would exclude 0 at its own level, but Holm stops at the failing one before it.
    none = {0: 0.0, 1: 0.0, 2: 0.0}
    fids = {"A": {0: 1.0, 1: -1.0, 2: 0.5}, "B": {0: -1.0, 1: -1.0, 2: -1.0}}
    out = compare_with_none(fids, none, {}, alpha=0.05, resamples=2000, seed=0)
    assert out[0].key == "B" and out[0].beats_none   # p = 0 first
    assert not out[1].beats_none


def run(key, seed, fid, augs=None, policy="expand", role="control"):
    members = tuple(augs if augs is not None else ([] if key == "none" else key.split("+")))
    return ValidatedRun(key, members, policy, role, seed, "finished", fid, [1, 2], [fid + 1, fid])


def test_nothing_beats_none_says_so_and_keeps_stage1():
    runs = [run("none", s, 10.0 + s) for s in range(3)]
    runs += [run("A+B", s, 10.5 + s) for s in range(3)] + [run("C", s, [9.0, 11.5, 12.1][s]) for s in range(3)]
    chosen, source, reason, verdict, winner, comps = decide(runs, {}, ["A", "B"], alpha=0.05, seed=0,
                                                            budget_steps=40, n_seeds=3)
    assert (chosen, source, winner) == (["A", "B"], "stage1", None)
    assert verdict.startswith("No subset beat plain data at this budget (40 steps, 3 seed(s))")
    assert verdict in reason and len(comps) == 2


def test_a_clear_winner_is_named_and_incomplete_subsets_are_not_compared():
    runs = [run("none", s, 10.0) for s in range(3)] + [run("C", s, 7.0 + 0.1 * s) for s in range(3)]
    runs += [run("D", 0, 1.0, role="proposal")]          # one seed only (never confirmed): not compared
    runs += [run("trivial", s, 5.0, augs=("C", "D"), policy="trivial") for s in range(3)]
    chosen, source, _, verdict, winner, comps = decide(runs, {"C": "published"}, ["A"], alpha=0.05, seed=0,
                                                       budget_steps=40, n_seeds=3)
    assert (chosen, source, winner) == (["C"], "stage2", "C")   # trivial beats none too, but is no subset
    assert {c.key for c in comps} == {"C", "trivial"} and verdict.startswith("C (published) beat plain data")
