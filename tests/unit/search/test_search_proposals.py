"""Stage 2's proposal space: one categorical over valid subsets; every proposal Optuna makes is valid."""
from math import comb

import optuna
import pytest

from search.halving import grace_steps, rung_steps
from search.proposals import members_of, proposal_choices, subset_key, valid_subsets
from search.validate import controls


def test_valid_subsets_count_is_the_sum_of_binomials():
    top = list("ABCDEFGH")
    assert len(valid_subsets(top, 3)) == comb(8, 1) + comb(8, 2) + comb(8, 3)
    assert all(1 <= len(s) <= 3 and len(set(s)) == len(s) for s in valid_subsets(top, 3))


def test_controls_are_left_out_and_keys_round_trip():
    choices = proposal_choices(["A", "B", "C"], 2, [(), ("A", "B"), ("C",)])
    assert "A+B" not in choices and "C" not in choices and len(choices) == 6 - 2
    assert all(subset_key(members_of(c)) == c for c in choices) and members_of("none") == ()


def test_every_tpe_proposal_is_a_valid_subset():
    top, k = list("ABCDEFGH"), 3
    choices = proposal_choices(top, k)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=5))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for _ in range(40):
        trial = study.ask()
        members = members_of(trial.suggest_categorical("subset", choices))
        assert 1 <= len(members) <= k and set(members) <= set(top) and len(set(members)) == len(members)
        study.tell(trial, float(len(members)))


def test_controls_deduplicate_singles_and_best_set():
    ctrl = controls(["A", "B", "C"], ["B", "A"], ["A", "B"])
    assert [t.key for t in ctrl] == ["none", "trivial", "A+B"]
    assert "K best singles" in ctrl[2].label and "best K-set" in ctrl[2].label   # labels claim no rule they lack
    assert ctrl[1].augmentations == ("A", "B", "C") and ctrl[1].policy == "trivial"


@pytest.mark.parametrize("budget, rungs", [(8, [2, 4]), (40, [10, 20]), (3, [1, 2]), (100, [25, 50])])
def test_grace_is_at_least_a_quarter_of_the_budget(budget, rungs):
    assert grace_steps(budget) * 4 >= budget and rung_steps(budget) == rungs


def test_a_train_fn_of_the_former_contract_is_still_called():
    from search.validate import call_train_fn

    seen = []
    old = lambda augs, budget, report, trial_dir: seen.append(("old", augs)) or {"fid": 1.0}

    def new(augs, budget, report, trial_dir, *, seed, policy):
        seen.append(("new", seed, policy))
        return {"fid": 2.0}
    assert call_train_fn(old, ["A"], 4, print, "/tmp", seed=3, policy="expand") == {"fid": 1.0}
    assert call_train_fn(new, ["A"], 4, print, "/tmp", seed=3, policy="trivial") == {"fid": 2.0}
    assert seen == [("old", ["A"]), ("new", 3, "trivial")]
