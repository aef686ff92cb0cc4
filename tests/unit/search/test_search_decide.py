"""Stage 2's leak check and the gate's failure message (pure functions; the Tune runs are in
tests/integration/search/test_search_tune.py and test_search_stage2.py)."""
import numpy as np

from search.gate_message import suggested_mse_min, too_few_kept
from search.select import RankRow
from search.validate import leak_check


def test_leak_check_flags_an_augmented_copy_closer_than_the_originals():
    rng = np.random.default_rng(0)
    orig = rng.normal(size=(200, 8))
    aug = orig + 3.0
    samples = rng.normal(size=(200, 8)) + 2.9     # the generator learned the augmented look
    leaks, report = leak_check(samples, orig, {"Shift": [aug], "Same": [orig + 0.0]})
    assert leaks == ["Shift"] and report["fid_samples_Shift"] < report["fid_samples_originals"]


def test_gate_message_names_the_dropped_and_the_resume_that_reuses_the_trials():
    rows = [RankRow(1, "Rotate", 1.0, 0.1, 0.05, True),
            RankRow(2, "HorizontalFlip", 2.0, 0.1, 0.0151, False, "mse 0.0151 <= mse_min 0.02 (near-identity)"),
            RankRow(3, "VerticalFlip", 2.5, 0.1, 0.0149, False, "mse 0.0149 <= mse_min 0.02 (near-identity)"),
            RankRow(4, "Shear", 9.0, 0.1, 1e-5, False, "mse 1e-05 <= mse_min 0.02 (near-identity)")]
    text = too_few_kept(rows, 3, 0.02, "lunar-search-1a2b")
    assert text.startswith("search.k: 3 is more than the 1 kept candidate(s) (Rotate).")
    assert "HorizontalFlip (MSE 0.0151), VerticalFlip (MSE 0.0149), Shear (MSE 1e-05)" in text
    assert "--resume lunar-search-1a2b --set search.mse_min=0.0148" in text
    assert "\n" not in text
    # The suggestion lets exactly the needed ones through the gate (kept iff MSE > mse_min).
    value = suggested_mse_min([0.0151, 0.0149, 1e-5], 2)
    assert sum(m > value for m in (0.0151, 0.0149, 1e-5)) == 2
    assert suggested_mse_min([0.01], 1) == 0.0099 and suggested_mse_min([0.0], 1) is None


def test_screening_says_when_it_stopped_before_proving_its_top():
    from search.select import SubsetRow, screening_note

    exact = [SubsetRow(i + 1, (f"E{i}",), 1.0 + i, 0.0, [1.0 + i]) for i in range(3)]
    proven = [*exact, SubsetRow(4, ("L",), 5.0, 0.0, [5.0], exact=False)]
    assert screening_note(proven, exact_top=3) == ""
    open_ = [*exact, SubsetRow(4, ("L",), 2.5, 0.0, [2.5], exact=False)]
    note = screening_note(open_, exact_top=3)
    assert "1 unscored subset(s) have a lower bound below the 3-th best exact FID 3" in note
    assert screening_note(exact) == ""
