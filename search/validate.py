"""Stage 2: validate augmentation subsets by short proxy trainings (Ray Tune + Optuna TPE + ASHA).

The search space is one boolean `use_<name>` per top-M kept candidate (Optuna refuses a
categorical whose choices change, so a subset cannot be one categorical). Subsets of size
0..K are trained; size 0 is the "no augmentation" control. A proposal with more than K members
is invalid: it is not trained and reports the objective +inf at once, so TPE learns to avoid
that region (resampling inside a Tune trial is not possible: the searcher owns the proposal).
The first trials are the control points every user asks about: no augmentation, the K best
singles, the best K-set (each restricted to the top-M).

Metrics: ASHA stops on the intermediate `fid_step` (reported at every evaluation, time attribute
`step`, which grows); Optuna reads the objective `fid_final`, which is +inf until the training
has finished. A trial ASHA stops therefore reaches Optuna as +inf (worst), never as a COMPLETE
trial with its partial FID. Optuna's searcher reads `fid_final` from every result, so it is in
every report.

The training itself is the caller's, `SearchContext.train_fn`: `train_fn(augmentations,
budget_steps, report, trial_dir)` calls `report(step, fid_vs_originals)` at each evaluation and
returns a dict with at least `fid` (final FID of the trained generator against the ORIGINAL
images), optionally `fid_std` (its measured spread), and `samples` (uint8 NCHW generated images)
or `sample_features` (their features in the search's extractor) for the leak check.

Decision: the best validated non-empty subset replaces stage 1's choice only when its trained FID
beats the trained FID of stage 1's choice by more than the larger of the two spreads (the
reported `fid_std`, else the spread of the last three evaluations). Kendall τ between stage-1
mixture FID and trained FID over the finished subsets says how far the proxy can be trusted.
Leak check: for each member a of the winner, FID(samples, augmented copy a) < FID(samples,
originals) means the generator learned the augmented look rather than the data: flagged.
"""
from __future__ import annotations

import io
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from ray import tune

from data_shards.environ import environ_set
from models.metrics.extractors import make_extractor
from search.context import SearchContext
from search.frechet import Gaussian, fid_gaussians
from search.originals import extract
from search.scoring import spread
from search.stage1 import concurrency_limit
from search.store import SearchStore

INTERMEDIATE, OBJECTIVE = "fid_step", "fid_final"
UNFINISHED = math.inf
LOW_TAU = 0.3


def subset_key(subset: Sequence[str]) -> str:
    return "+".join(subset) if subset else "none"


@dataclass
class ValidatedSubset:
    augmentations: tuple[str, ...]
    status: str                      # "finished", "stopped" (by ASHA), "invalid" (> K), "failed"
    fid: float | None = None         # final trained FID against the originals
    fid_spread: float = 0.0
    steps: list[int] = field(default_factory=list)
    fids: list[float] = field(default_factory=list)
    proxy_fid: float | None = None   # stage-1 mixture FID of the same subset

    @property
    def key(self) -> str:
        return subset_key(self.augmentations)


@dataclass
class ValidationResult:
    subsets: list[ValidatedSubset]
    chosen: list[str]
    source: str                      # "stage2" or "stage1"
    reason: str
    kendall_tau: float | None = None
    tau_pvalue: float | None = None
    warning: str = ""
    leaks: list[str] = field(default_factory=list)
    leak_report: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "subsets"},
                "subsets": [asdict(s) for s in self.subsets]}


def _measured_spread(out: dict, fids: list[float]) -> float:
    if out.get("fid_std") is not None:
        return float(out["fid_std"])
    return spread(fids[-3:])   # evaluation noise near the end of the budget


def _trial(config: dict, payload: tuple) -> None:
    train_fn, top, k, budget, storage, extractor_name, weights, cpus = payload
    subset = tuple(n for n in top if config[f"use_{n}"])
    if len(subset) > k:
        tune.report({OBJECTIVE: UNFINISHED, "subset": subset_key(subset), "valid": False})
        return
    torch.set_num_threads(max(1, int(cpus)))
    store, key = storage, subset_key(subset)
    if store.exists("stage2", f"{key}.json"):
        # The same subset proposed twice, or a resumed search: replay the stored training.
        rec = store.read_json("stage2", f"{key}.json")
        for s, f in zip(rec["steps"], rec["fids"]):
            tune.report({"step": s, INTERMEDIATE: f, OBJECTIVE: UNFINISHED, "subset": key})
        tune.report({"step": rec["final_step"], INTERMEDIATE: rec["fid"], OBJECTIVE: rec["fid"], "subset": key})
        return
    steps, fids = [], []

    def report(step: int, fid: float) -> None:
        steps.append(int(step))
        fids.append(float(fid))
        tune.report({"step": int(step), INTERMEDIATE: float(fid), OBJECTIVE: UNFINISHED, "subset": key})

    trial_dir = tune.get_context().get_trial_dir() or os.getcwd()
    out = train_fn(list(subset), budget, report, trial_dir)
    if "fid" not in out:
        raise ValueError("train_fn must return a dict with 'fid' (final FID against the originals)")
    feats = out.get("sample_features")
    if feats is None and out.get("samples") is not None:
        feats = extract(make_extractor(extractor_name, weights), out["samples"])
    if feats is not None:
        buf = io.BytesIO()
        np.save(buf, np.asarray(feats, dtype=np.float32))
        store.write_bytes(buf.getvalue(), "stage2", f"{key}.samples.npy")
    final_step = max([budget, *steps])
    store.write_json({"augmentations": list(subset), "fid": float(out["fid"]), "steps": steps, "fids": fids,
                      "final_step": final_step, "fid_spread": _measured_spread(out, fids),
                      "has_samples": feats is not None}, "stage2", f"{key}.json")
    tune.report({"step": final_step, INTERMEDIATE: float(out["fid"]), OBJECTIVE: float(out["fid"]), "subset": key})


class _Watch(tune.Callback):
    """Driver side: every trial's history (ASHA-stopped ones included) and a hook per finished trial."""

    def __init__(self, on_trial: Callable[[str, dict], None] | None):
        self.history: dict[str, list[dict]] = {}
        self.on_trial = on_trial

    def __getstate__(self):
        return {**self.__dict__, "on_trial": None}   # see stage1._Forward

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.history.setdefault(trial.trial_id, []).append(
            {k: result.get(k) for k in ("step", INTERMEDIATE, OBJECTIVE, "subset", "valid")})

    def on_trial_complete(self, iteration, trials, trial, **info):
        if self.on_trial:
            self.on_trial(trial.trial_id, {"config": trial.config, "history": self.history.get(trial.trial_id, [])})


def control_points(top: Sequence[str], singles: Sequence[str], best_set: Sequence[str]) -> list[dict[str, bool]]:
    """No augmentation, the K best singles, the best K-set, each restricted to the top-M, deduplicated."""
    points, seen = [], set()
    for subset in ([], singles, best_set):
        members = frozenset(n for n in subset if n in top)
        if members not in seen:
            seen.add(members)
            points.append({f"use_{n}": n in members for n in top})
    return points


def kendall(subsets: Sequence[ValidatedSubset]) -> tuple[float | None, float | None]:
    from scipy.stats import kendalltau

    pairs = [(s.proxy_fid, s.fid) for s in subsets if s.status == "finished" and s.proxy_fid is not None]
    if len(pairs) < 3:
        return None, None
    res = kendalltau([p for p, _ in pairs], [t for _, t in pairs])
    tau = None if np.isnan(res.statistic) else float(res.statistic)
    return tau, (None if np.isnan(res.pvalue) else float(res.pvalue))


def decide(subsets: Sequence[ValidatedSubset], stage1_choice: Sequence[str]) -> tuple[list[str], str, str]:
    """(chosen, source, reason): see the module docstring."""
    finished = [s for s in subsets if s.status == "finished"]
    s1 = next((s for s in subsets if set(s.augmentations) == set(stage1_choice)), None)
    candidates = [s for s in finished if s.augmentations]
    none = next((s for s in finished if not s.augmentations), None)
    note = ""
    if none and candidates and none.fid < min(s.fid for s in candidates):
        note = (f" Note: no augmentation trained to FID {none.fid:.4g}, better than every augmented subset at "
                f"this budget; short proxies favour plain data, judge with longer runs.")
    if not candidates:
        return list(stage1_choice), "stage1", "no augmented subset finished its proxy training; kept stage 1's choice." + note
    best = min(candidates, key=lambda s: s.fid)
    if s1 is None:
        return list(stage1_choice), "stage1", ("stage 1's choice was not trained (outside the top-M or the trial "
                                               "budget); kept it, nothing to compare against." + note)
    if s1.status == "stopped":
        return list(best.augmentations), "stage2", (
            f"stage 1's choice {subset_key(s1.augmentations)} was stopped early by ASHA (FID {s1.fids[-1]:.4g} at "
            f"step {s1.steps[-1]}); the best finished subset {best.key} trained to FID {best.fid:.4g}." + note)
    if s1.status != "finished":
        return list(stage1_choice), "stage1", f"stage 1's choice {s1.key} did not finish ({s1.status}); kept it." + note
    margin = max(best.fid_spread, s1.fid_spread)
    if best.key != s1.key and best.fid + margin < s1.fid:
        return list(best.augmentations), "stage2", (
            f"validated subset {best.key} trained to FID {best.fid:.4g}, better than stage 1's {s1.key} "
            f"({s1.fid:.4g}) by more than the measured spread {margin:.3g}." + note)
    why = ("it is stage 1's choice itself" if best.key == s1.key else
           f"the best validated subset {best.key} ({best.fid:.4g}) does not beat it by more than the measured "
           f"spread {margin:.3g}")
    return list(stage1_choice), "stage1", f"kept stage 1's choice {s1.key} (trained FID {s1.fid:.4g}): {why}." + note


def leak_check(sample_features: np.ndarray, originals_features: np.ndarray,
               augmented_features: dict[str, list[np.ndarray]]) -> tuple[list[str], dict[str, Any]]:
    """Members whose augmented copies are closer (FID) to the generator's samples than the originals."""
    g = Gaussian(sample_features)
    to_orig = fid_gaussians(g, Gaussian(originals_features))
    report: dict[str, Any] = {"fid_samples_originals": to_orig}
    leaks = []
    for name, feats in augmented_features.items():
        d = float(np.mean([fid_gaussians(g, Gaussian(f)) for f in feats]))
        report[f"fid_samples_{name}"] = d
        if d < to_orig:
            leaks.append(name)
    return leaks, report


def run_stage2(ctx: SearchContext, *, top: Sequence[str], singles: Sequence[str], best_set: Sequence[str],
               stage1_choice: Sequence[str], proxy: Callable[[Sequence[str]], float],
               augmented_features: Callable[[str], list[np.ndarray]], grace_steps: int | None = None,
               on_subset: Callable[[ValidatedSubset], None] | None = None) -> ValidationResult:
    from optuna.samplers import TPESampler
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.search.optuna import OptunaSearch

    if ctx.train_fn is None:
        raise ValueError("run_stage2: the context has no train_fn")
    cfg, store, log, resources = ctx.config, ctx.store, ctx.say, ctx.stage2_resources
    k, trials, budget_steps = cfg.k, cfg.validate_.trials, cfg.validate_.budget_steps
    top = list(top)
    points = control_points(top, singles, best_set)[:trials]
    searcher = OptunaSearch(metric=OBJECTIVE, mode="min", points_to_evaluate=points,
                            sampler=TPESampler(seed=cfg.seed))
    grace = grace_steps or max(1, budget_steps // 4)
    # stop_last_trials=False: a trial that reaches max_t must still deliver its final objective.
    scheduler = ASHAScheduler(time_attr="step", metric=INTERMEDIATE, mode="min", max_t=max(budget_steps, grace),
                              grace_period=grace, reduction_factor=2, stop_last_trials=False)
    limit = concurrency_limit(resources, cfg.concurrency)
    found: dict[str, ValidatedSubset] = {}

    def finished_trial(trial_id: str, info: dict) -> None:
        subset = tuple(n for n in top if info["config"][f"use_{n}"])
        sub = _collect(subset, info["history"], store, k)
        sub.proxy_fid = proxy(subset) if len(subset) <= k else None
        if sub.key not in found or found[sub.key].status != "finished":
            found[sub.key] = sub
        log(f"stage 2: {sub.key}: {sub.status}" + (f", trained FID {sub.fid:.4g}" if sub.fid is not None else ""))
        if on_subset:
            on_subset(sub)

    watch = _Watch(finished_trial)
    # Trials get these values, never the context: its tracker and originals stay on the driver (store: see stage1).
    payload = (ctx.train_fn, top, k, budget_steps, store, ctx.extractor, ctx.extractor_weights, resources["CPU"])
    trainable = tune.with_resources(tune.with_parameters(_trial, payload=payload),
                                    {"cpu": resources["CPU"], "gpu": resources.get("GPU", 0.0)})
    path, fs = store.tune_storage()
    log(f"stage 2: {trials} trial(s) over the top {len(top)} ({', '.join(top)}), subsets of 1..{k}, "
        f"{budget_steps} steps each, up to {limit} at once")
    tuner = tune.Tuner(
        trainable,
        param_space={f"use_{n}": tune.choice([False, True]) for n in top},
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=trials,
                                    max_concurrent_trials=limit),
        run_config=tune.RunConfig(name=f"stage2-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                                  storage_path=path, storage_filesystem=fs, verbose=0,
                                  callbacks=[watch, CSVLoggerCallback(), JsonLoggerCallback()]),
    )
    with _tune_env():
        grid = tuner.fit()
    errors = [str(r.error) for r in grid if r.error]
    if errors and not any(s.status == "finished" for s in found.values()):
        raise RuntimeError("every stage-2 trial failed:\n  " + "\n  ".join(errors[:5]))
    subsets = sorted(found.values(), key=lambda s: (s.status != "finished", s.fid if s.fid is not None else math.inf))
    chosen, source, reason = decide(subsets, stage1_choice)
    tau, p = kendall(subsets)
    n_fin = sum(s.status == "finished" for s in subsets)
    if tau is None:
        warning = f"too few finished subsets ({n_fin}) to measure how well stage 1 predicts training (need 3)."
    elif tau < LOW_TAU:
        warning = (f"the stage-1 score did NOT predict the trained FID here (Kendall tau {tau:.2f} over {n_fin} "
                   f"subsets): do not trust the proxy ranking on this data; prefer validated subsets.")
    else:
        warning = ""
    leaks, leak_report = [], {"checked": False}
    key = subset_key(tuple(n for n in top if n in chosen)) if set(chosen) <= set(top) else None
    if key and store.exists("stage2", f"{key}.samples.npy"):
        samples = np.load(io.BytesIO(store.read_bytes("stage2", f"{key}.samples.npy")))
        leaks, leak_report = leak_check(samples, ctx.originals.features, {n: augmented_features(n) for n in chosen})
        leak_report["checked"] = True
    else:
        leak_report["why_not"] = "the winner's proxy training returned no samples (or the winner was not trained)"
    return ValidationResult(subsets=subsets, chosen=chosen, source=source, reason=reason, kendall_tau=tau,
                            tau_pvalue=p, warning=warning, leaks=leaks, leak_report=leak_report)


def _tune_env():
    """Two Tune settings for the stage-2 run only, restored after it:
    - intermediate results carry the ASHA metric and invalid ones do not, so Tune's strict check
      (every result carries every metric) does not fit; it is switched off;
    - the automatic TensorBoard logger, which warns at every +inf objective, is not added (the CSV
      and JSON loggers are passed explicitly)."""
    return environ_set({"TUNE_DISABLE_STRICT_METRIC_CHECKING": "1", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"})


def _collect(subset: tuple[str, ...], history: list[dict], store: SearchStore, k: int) -> ValidatedSubset:
    key = subset_key(subset)
    if len(subset) > k:
        return ValidatedSubset(subset, "invalid")
    if store.exists("stage2", f"{key}.json"):
        rec = store.read_json("stage2", f"{key}.json")
        return ValidatedSubset(subset, "finished", rec["fid"], rec["fid_spread"], rec["steps"], rec["fids"])
    steps = [int(h["step"]) for h in history if h.get("step") is not None and h.get(INTERMEDIATE) is not None]
    fids = [float(h[INTERMEDIATE]) for h in history if h.get("step") is not None and h.get(INTERMEDIATE) is not None]
    return ValidatedSubset(subset, "stopped" if steps else "failed", None, spread(fids[-3:]), steps, fids)
