"""Stage 2's decision, Kendall tau and leak check (pure functions; the Tune run is in test_search_tune)."""
import numpy as np
import pytest
from scipy.stats import kendalltau

from search.validate import ValidatedSubset, control_points, decide, kendall, leak_check


def fin(members, fid, spread=0.0, proxy=None):
    return ValidatedSubset(tuple(members), "finished", fid, spread, [1, 2], [fid * 2, fid], proxy)


def test_validated_subset_must_beat_stage1_beyond_the_spread():
    s1 = ["A", "B"]
    chosen, source, why = decide([fin("AB", 10.0, 0.5), fin("C", 9.0, 0.4)], s1)
    assert (chosen, source) == (["C"], "stage2") and "measured spread 0.5" in why
    chosen, source, why = decide([fin("AB", 10.0, 1.5), fin("C", 9.0, 0.4)], s1)
    assert (chosen, source) == (s1, "stage1") and "does not beat it" in why
    stopped = ValidatedSubset(("A", "B"), "stopped", None, 0.0, [1], [30.0])
    chosen, source, why = decide([stopped, fin("C", 9.0)], s1)
    assert (chosen, source) == (["C"], "stage2") and "stopped early by ASHA" in why
    chosen, source, why = decide([fin("C", 9.0)], s1)
    assert (chosen, source) == (s1, "stage1") and "not trained" in why
    chosen, _, why = decide([fin("", 1.0), fin("AB", 10.0)], s1)
    assert chosen == s1 and "no augmentation trained to FID 1" in why


def test_kendall_tau_is_scipy_s_over_finished_subsets():
    subs = [fin("A", 3.0, proxy=0.1), fin("B", 1.0, proxy=0.3), fin("C", 2.0, proxy=0.2),
            ValidatedSubset(("D",), "stopped", None, 0, [1], [5.0], 0.05)]
    tau, p = kendall(subs)
    assert tau == pytest.approx(kendalltau([0.1, 0.3, 0.2], [3.0, 1.0, 2.0]).statistic)
    assert kendall(subs[:2]) == (None, None)


def test_control_points_restrict_to_top_m_and_deduplicate():
    pts = control_points(["A", "B", "C"], ["A", "D"], ["A", "D"])
    assert pts == [{"use_A": False, "use_B": False, "use_C": False}, {"use_A": True, "use_B": False, "use_C": False}]


def test_leak_check_flags_an_augmented_copy_closer_than_the_originals():
    rng = np.random.default_rng(0)
    orig = rng.normal(size=(200, 8))
    aug = orig + 3.0
    samples = rng.normal(size=(200, 8)) + 2.9     # the generator learned the augmented look
    leaks, report = leak_check(samples, orig, {"Shift": [aug], "Same": [orig + 0.0]})
    assert leaks == ["Shift"] and report["fid_samples_Shift"] < report["fid_samples_originals"]
