"""Stage 2 on real Ray Tune, Optuna and MLflow, with stand-in training functions (no GAN): controls
never stopped early, a stopped proposal never wins, augmentation that helps only late still wins,
and a verdict that says so when nothing beats plain data.

The stand-ins report FID at steps 2, 4, 6, 8 of an 8-step budget; rungs sit at 2 and 4.
"""
import math
import sys
from types import SimpleNamespace

import optuna
import pytest
import ray.cloudpickle
from mlflow.tracking import MlflowClient

from search.config import load_config
from search.context import SearchContext
from search.halving import RecordedHalving
from search.stage2_tracking import TAG_SEED, log_stage2_run
from search.store import SearchStore
from search.tracking import TAG_PARENT, TAG_TRIAL, SearchTracker
from search.validate import INTERMEDIATE, run_stage2

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # Tune's workers cannot import this module

TOP = ["A", "B", "C", "G"]
SINGLES, BEST_SET = ["A", "B"], ["A", "C"]
BUDGET = 8


def late_help_fid(augmentations, step, seed, policy):
    """Plain data is best early; G alone is best at the end; B+C would be best of all but is far
    worse early (so halving stops it); every augmented run pays 6·(1 − step/budget) early on."""
    key = "+".join(augmentations) if policy == "expand" else "trivial"
    final = {"": 10.0, "G": 7.0, "B+C": 1.0}.get(key, 8.0 if "G" in augmentations else 10.5 + 0.2 * len(augmentations))
    early = 0.0 if not augmentations else (100.0 if key == "B+C" else 6.0)
    return final + early * (1 - step / BUDGET) + 0.05 * ((seed * 7 + len(key)) % 3)


def flat_fid(augmentations, step, seed, policy):
    """Nothing beats plain data: augmented runs end level with none, give or take the seed."""
    return 10.0 + (0.0 if not augmentations else [0.4, -0.3, 0.2][seed % 3]) + 5 * (1 - step / BUDGET)


def stand_in(fid):
    def train(augmentations, budget_steps, report, trial_dir, *, seed, policy):
        for step in (2, 4, 6, 8):
            report(step, fid(augmentations, step, seed, policy))
        final = fid(augmentations, budget_steps, seed, policy)
        return {"fid": final, "kid": final / 100}   # a KID beside it, as the real proxy reports
    return train


def stage2(tmp_path, fid, seeds, trials):
    cfg = load_config({"k": 2, "concurrency": 1, "seed": 0,
                       "validate": {"top_m": 4, "trials": trials, "budget_steps": BUDGET, "seeds": seeds}})
    tracker = SearchTracker(f"sqlite:///{tmp_path}/mlflow.db", "stage2", "s2")
    parent = tracker.open_parent(None)
    ctx = SearchContext(config=cfg, candidates=TOP, channels=1, originals=SimpleNamespace(features=None),
                        extractor="randconv", extractor_weights=None, store=SearchStore(str(tmp_path / "s2")),
                        tracker=tracker, parent_run_id=parent, name="s2", train_fn=stand_in(fid),
                        validate_resources={"CPU": 1.0, "GPU": 0.0})
    result = run_stage2(ctx, top=TOP, kept=TOP, singles=SINGLES, best_set=BEST_SET, stage1_choice=BEST_SET,
                        proxy=lambda subset: float(len(subset)), augmented_features=lambda n: [],
                        on_run=lambda run: log_stage2_run(tracker, run, BUDGET))
    return result, tracker, parent


def test_late_help_wins_controls_run_in_full_and_a_stopped_trial_never_wins(ray_local, tmp_path):
    v, tracker, parent = stage2(tmp_path, late_help_fid, seeds=3, trials=8)
    controls = [r for r in v.runs if r.role == "control"]
    assert {r.key for r in controls} == {"none", "trivial", "A+B", "A+C"}
    assert all(r.status == "finished" and r.steps[-1] == BUDGET for r in controls)
    assert sorted(r.seed for r in controls if r.key == "none") == [0, 1, 2]
    proposals = [r for r in v.runs if r.role == "proposal"]
    assert proposals and all(1 <= len(r.augmentations) <= 2 and set(r.augmentations) <= set(TOP) for r in proposals)
    judged = {d["trial"] for d in v.rung_decisions}
    assert not judged & {"none", "trivial", "A+B", "A+C"}           # no control ever met a rung
    # B+C would have been best of all at the budget, but halving stopped it: it cannot win.
    stopped = {r.key for r in v.runs if r.status == "stopped"}
    assert "B+C" in stopped and v.winner != "B+C" and "B+C" not in {c.key for c in v.comparisons}
    assert sum(r["stopped"] for r in v.rungs) == len(stopped) and v.rungs[0]["judged"] >= 8 - 1
    assert all(d["cutoff"] is None or d["stopped"] == (d["value"] > d["cutoff"]) for d in v.rung_decisions)
    # In the stored Optuna study (what optuna-dashboard shows) a stopped proposal is PRUNED, not finished.
    study = optuna.load_study(study_name="stage2-proposals", storage=f"sqlite:///{tmp_path}/s2/optuna.db")
    state = {t.params["subset"]: t.state for t in study.trials}
    assert {key for key, s in state.items() if s == optuna.trial.TrialState.PRUNED} == stopped
    assert all(math.isfinite(t.value) for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    # G helps only late, yet wins: confirmed on every seed, its interval below zero.
    assert v.winner == "G" and v.chosen == ["G"] and v.source == "stage2"
    assert sorted(r.seed for r in v.runs if r.key == "G") == [0, 1, 2]
    g = next(c for c in v.comparisons if c.key == "G")
    assert g.beats_none and g.high < 0 and g.seeds == [0, 1, 2] and "Holm" in v.correction
    # Every run records its seed, in the result and on its MLflow child run.
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    children = client.search_runs([tracker.experiment_id], f"tags.`{TAG_PARENT}` = '{parent}'")
    assert len(children) == len({(r.key, r.seed) for r in v.runs})
    for c in children:
        assert c.data.params["seed"] == c.data.tags[TAG_SEED] == c.data.tags[TAG_TRIAL].rsplit("@seed", 1)[1]


def test_the_former_arrangement_stops_the_late_winner():
    """The bias case: with 'none' judged at the same rung (the former single ASHA run, controls
    first), G is stopped at the first rung, so it could never win."""
    halving = RecordedHalving(time_attr="step", metric=INTERMEDIATE, budget_steps=BUDGET)
    for key, augs in (("none", []), ("G", ["G"])):
        action = halving.on_trial_result(None, SimpleNamespace(trial_id=key),
                                         {"step": 2, INTERMEDIATE: late_help_fid(augs, 2, 0, "expand"), "subset": key})
    assert action == "STOP" and halving.rungs == [2, 4]


def test_nothing_beats_none_and_the_verdict_says_so(ray_local, tmp_path):
    v, _, _ = stage2(tmp_path, flat_fid, seeds=2, trials=2)
    assert v.winner is None and v.source == "stage1" and v.chosen == BEST_SET
    assert v.verdict.startswith("No subset beat plain data at this budget (8 steps, 2 seed(s))")
    assert v.verdict in v.reason
    assert all(not c.beats_none for c in v.comparisons) and len(v.comparisons) >= 3
    # Each subset's trained KID (mean and spread over its seeds) is kept beside its FID.
    none = v.trained["none"]
    assert none["seeds"] == [0, 1] and none["kid"] == pytest.approx(none["fid"] / 100) and none["kid_std"] == 0.0


def test_a_resumed_stage2_continues_the_optuna_study_with_no_extra_trials(ray_local, tmp_path):
    first, _, _ = stage2(tmp_path, late_help_fid, seeds=1, trials=3)
    db = f"sqlite:///{tmp_path}/s2/optuna.db"
    trials = optuna.load_study(study_name="stage2-proposals", storage=db).trials
    assert len(trials) == 3
    runs = sorted((tmp_path / "s2" / "stage2").rglob("seed-*.json"))
    stamps = {p: p.stat().st_mtime_ns for p in runs}
    again, _, _ = stage2(tmp_path, late_help_fid, seeds=1, trials=3)
    assert len(optuna.load_study(study_name="stage2-proposals", storage=db).trials) == 3   # no extra trial
    assert {p: p.stat().st_mtime_ns for p in runs} == stamps                              # nothing retrained
    assert sorted((tmp_path / "s2" / "stage2").rglob("seed-*.json")) == runs
    key = lambda v: sorted((r.key, r.seed, r.status, r.fid) for r in v.runs)
    assert key(again) == key(first) and again.chosen == first.chosen
