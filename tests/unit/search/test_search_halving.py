"""Successive halving as stage 2 runs it: the same stop/continue decisions as Ray's ASHAScheduler
(an independent implementation of the rule), every decision recorded with its cutoff, and the
former arrangement's bias (plain data judged at the same rung) shown on Ray's own scheduler."""
from types import SimpleNamespace

import numpy as np
from ray.tune.schedulers import ASHAScheduler

from search.halving import RecordedHalving

METRIC, BUDGET = "fid_step", 16


def ray_asha():
    return ASHAScheduler(time_attr="step", metric=METRIC, mode="min", max_t=BUDGET, grace_period=BUDGET // 4,
                         reduction_factor=2, stop_last_trials=False)


def test_decisions_equal_ray_s_asha_on_random_curves():
    rng = np.random.default_rng(0)
    ours, theirs = RecordedHalving(time_attr="step", metric=METRIC, budget_steps=BUDGET), ray_asha()
    trials = [SimpleNamespace(trial_id=f"t{i}") for i in range(12)]
    for t in trials:
        theirs.on_trial_add(None, t)
    alive = {t.trial_id for t in trials}
    # Trials report in turns, as concurrent trials do. Up to the step before the budget: Ray also keeps
    # a rung at the budget itself, where a trial has finished whatever the scheduler says.
    for step in range(2, BUDGET, 2):
        for t in trials:
            if t.trial_id not in alive:
                continue
            result = {"step": step, METRIC: float(rng.normal(10, 3)), "subset": t.trial_id}
            a, b = ours.on_trial_result(None, t, result), theirs.on_trial_result(None, t, result)
            assert a == b, (step, t.trial_id)
            if a == "STOP":
                alive.discard(t.trial_id)
    assert ours.rungs == [4, 8] and 0 < len(alive) < len(trials)
    assert sum(r["stopped"] for r in ours.summary()) == len(trials) - len(alive)
    for d in ours.record():
        assert d["cutoff"] is None or d["stopped"] == (d["value"] > d["cutoff"])


def test_plain_data_at_the_same_rung_stops_a_late_helping_subset_on_ray_s_asha():
    """The review's bias case on Ray's scheduler: 'none' (FID 10 at the first rung) is recorded
    first; an augmented subset that ends far better but is at 11.5 at that rung is stopped."""
    asha = ray_asha()
    none, late = SimpleNamespace(trial_id="none"), SimpleNamespace(trial_id="G")
    for t in (none, late):
        asha.on_trial_add(None, t)
    assert asha.on_trial_result(None, none, {"step": 4, METRIC: 10.0}) == "CONTINUE"
    assert asha.on_trial_result(None, late, {"step": 4, METRIC: 11.5}) == "STOP"
