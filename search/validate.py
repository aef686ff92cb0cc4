"""Stage 2: validate augmentation subsets by short proxy trainings, and give a verdict with its uncertainty.

Three Ray Tune runs, each trial one proxy training of one subset at one seed:

1. Controls, with every seed (`search.validate.seeds`), to the full budget, without a scheduler,
   so never stopped early: no augmentation ("none"); a TrivialAugment-style control ("trivial":
   one kept candidate drawn uniformly per image, per draw); the published choice (the K best
   singles); the best K-set by stage-1 mixture FID.
2. Proposals: Optuna TPE samples one categorical over the valid subsets of the top M that are not
   controls (`search.proposals`), at the first seed, under successive halving among the proposals
   only (`search.halving`: grace period at least a quarter of the budget, every rung's cutoff
   recorded). A stopped proposal has no final FID and cannot win.
3. Confirmation: the best proposal that finished, with the remaining seeds, to the full budget.

The verdict (`search.verdict`): each subset that ran every seed is compared with "none" by paired
differences at equal seeds, with a bootstrap interval, Holm-corrected across the subsets
compared. A subset wins only when its interval lies below zero; among winners the one with the
most negative mean difference is chosen. TrivialAugment-style is compared and reported but cannot
be written into a spec (`augment.mineaug` is a list of candidates). Without a winner the choice of
`search.select` stands, and the verdict says in plain words that no subset beat plain data.
Rank agreement (`search.rank_agreement`): Kendall τ and Spearman ρ per subset size over subsets
trained to the full budget. Leak check: for each member a of the chosen subset, KID(samples,
augmented copy a) below KID(samples, originals) by more than a noise margin (`leak_check`) means
the generator learned the augmented look.

The training itself is the caller's, `SearchContext.train_fn`:
`train_fn(augmentations, budget_steps, report, trial_dir, *, seed, policy)` calls
`report(step, fid_vs_originals)` at each evaluation and returns a dict with at least `fid` (final
FID against the ORIGINAL images), optionally `kid` (final KID, likewise), `samples` (uint8 NCHW) or `sample_features` for the
leak check. `policy` is "expand" (MineAug's N·(1+K) expansion of `augmentations`) or "trivial"
(one of `augmentations` per image per draw). Each run is stored as `stage2/<key>/seed-<seed>.json`
by the trial itself; a resumed search (or a repeated proposal) replays it instead of training.
"""
from __future__ import annotations

import inspect
import io
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from ray import tune

from data_shards.environ import environ_set
from models.metrics.extractors import make_extractor
from search.context import SearchContext
from search.frechet import Gaussian, fid_gaussians
from search.gpu_share import trial_gpu_share
from search.halving import RecordedHalving, grace_steps
from models.metrics.kid import SUBSET_SIZE
from search.kid import kid_subset_values, kid_with_std
from search.labels import best_set_rule, singles_rule
from search.scoring import spread
from search.originals import extract
from search.proposals import NONE_KEY, in_order, members_of, proposal_choices, subset_key
from search.rank_agreement import SizeAgreement, agreement_by_size
from search.stage1 import concurrency_limit
from search.store import SearchStore
from search.verdict import CORRECTION, Comparison, compare_with_none, no_winner_sentence, winner_sentence

INTERMEDIATE, OBJECTIVE = "fid_step", "fid_final"
UNFINISHED = math.inf
TRIVIAL_KEY = "trivial"
EXPAND, TRIVIAL = "expand", "trivial"


def seed_list(base: int, count: int) -> list[int]:
    return [base + i for i in range(count)]


@dataclass(frozen=True)
class Treatment:
    key: str
    augmentations: tuple[str, ...]
    policy: str          # EXPAND or TRIVIAL
    role: str            # "control" or "proposal"
    label: str           # which rule produced it


def controls(kept: Sequence[str], singles: Sequence[str], best_set: Sequence[str],
             singles_label: str = "the K best singles", best_set_label: str = "best K-set by stage-1 mixture FID"
             ) -> list[Treatment]:
    """none, TrivialAugment-style, the K best singles, the best K-set (a set named twice runs once);
    the labels name the rule that produced each set (search.labels)."""
    out = [Treatment(NONE_KEY, (), EXPAND, "control", "no augmentation"),
           Treatment(TRIVIAL_KEY, tuple(kept), TRIVIAL, "control",
                     "TrivialAugment-style: one kept candidate per image per draw")]
    for members, label in ((singles, singles_label), (best_set, best_set_label)):
        members = in_order(members, kept)
        same = next((t for t in out if t.policy == EXPAND and set(t.augmentations) == set(members)), None)
        if same is None:
            out.append(Treatment(subset_key(members), members, EXPAND, "control", label))
        else:
            out[out.index(same)] = Treatment(same.key, same.augmentations, EXPAND, "control", f"{same.label}; {label}")
    return out


@dataclass
class ValidatedRun:
    """One proxy training: one treatment at one seed."""
    key: str
    augmentations: tuple[str, ...]
    policy: str
    role: str
    seed: int
    status: str                      # "finished", "stopped" (by halving), "failed"
    fid: float | None = None         # final trained FID against the originals
    steps: list[int] = field(default_factory=list)
    fids: list[float] = field(default_factory=list)
    proxy_fid: float | None = None   # stage-1 mixture FID of the same subset (expand policy)
    error: str = ""
    kid: float | None = None         # final trained KID against the originals, when the proxy reports it


@dataclass
class ValidationResult:
    runs: list[ValidatedRun]
    chosen: list[str]
    source: str                      # "stage2" (a subset beat none) or "stage1" (search.select's choice stands)
    reason: str
    verdict: str                     # the plain-words sentence that goes into the run and the written spec
    winner: str | None
    comparisons: list[Comparison] = field(default_factory=list)
    correction: str = ""
    agreement: list[SizeAgreement] = field(default_factory=list)
    rungs: list[dict] = field(default_factory=list)       # per rung: judged, stopped, last cutoff
    rung_decisions: list[dict] = field(default_factory=list)
    warning: str = ""
    leaks: list[str] = field(default_factory=list)
    leak_report: dict[str, Any] = field(default_factory=dict)
    # subset key -> trained {fid, fid_std, kid, kid_std, seeds}: mean and spread over its finished seeds
    trained: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def kendall_tau(self) -> float | None:
        """τ of the largest subset size that has one (kept for callers that log one number)."""
        taus = [a.tau for a in self.agreement if a.tau is not None]
        return taus[-1] if taus else None

    def summary(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "runs"},
                "runs": [asdict(r) for r in self.runs]}


def _run_path(key: str, seed: int) -> tuple[str, str, str]:
    return "stage2", key, f"seed-{seed}.json"


def _samples_path(key: str, seed: int) -> tuple[str, str, str]:
    return "stage2", key, f"seed-{seed}.samples.npy"


def _finite(v: float) -> float:
    """A NaN/inf FID (a diverged proxy) ranks worst at a rung instead of poisoning the cutoff."""
    return float(v) if math.isfinite(v) else math.inf


def call_train_fn(train_fn: Callable, augmentations: list[str], budget: int, report: Callable[[int, float], None],
                  trial_dir: str, *, seed: int, policy: str) -> dict:
    """`train_fn` with the seed and the policy; a function written for the former contract (four
    arguments) is still called, without them: its runs at every seed are then the same training,
    and its "trivial" control trains on the expansion of every kept candidate."""
    try:
        params = inspect.signature(train_fn).parameters
    except (TypeError, ValueError):
        params = {}
    takes = lambda name: name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    extra = {k: v for k, v in (("seed", seed), ("policy", policy)) if takes(k)}
    return train_fn(augmentations, budget, report, trial_dir, **extra)


def _trial(config: dict, payload: tuple) -> None:
    train_fn, kept, budget, store, extractor_name, weights, resources, first_seed = payload
    torch.set_num_threads(max(1, int(resources["CPU"])))
    # The proxy training capped to the trial's GPU share; its networks are unreferenced once
    # _proxy_run returns, so the cache emptied at the block's end gives their memory back.
    with trial_gpu_share(resources):
        _proxy_run(config, train_fn, kept, budget, store, extractor_name, weights, first_seed)


def _proxy_run(config: dict, train_fn: Callable, kept: Sequence[str], budget: int, store: SearchStore,
               extractor_name: str, weights: str | None, first_seed: int) -> None:
    """One stage-2 trial: a stored run replayed, or one proxy training run, stored and reported."""
    config = config.get("run", config)   # controls and confirmations: a grid over whole runs
    key, seed, policy = config["subset"], int(config.get("seed", first_seed)), config.get("policy", EXPAND)
    augmentations = list(kept) if policy == TRIVIAL else list(members_of(key))
    tags = {"subset": key, "seed": seed}
    rec = store.read_json(*_run_path(key, seed)) if store.exists(*_run_path(key, seed)) else None
    if rec is not None and rec.get("budget_steps", budget) == budget:
        # The same subset proposed twice, or a resumed search: replay the stored training.
        for s, f in zip(rec["steps"], rec["fids"]):
            tune.report({"step": s, INTERMEDIATE: _finite(f), OBJECTIVE: UNFINISHED, **tags})
        tune.report({"step": rec["final_step"], INTERMEDIATE: rec["fid"], OBJECTIVE: rec["fid"], **tags})
        return
    steps, fids = [], []

    def report(step: int, fid: float) -> None:
        steps.append(int(step))
        fids.append(float(fid))
        tune.report({"step": int(step), INTERMEDIATE: _finite(fid), OBJECTIVE: UNFINISHED, **tags})

    trial_dir = tune.get_context().get_trial_dir() or os.getcwd()
    out = call_train_fn(train_fn, augmentations, budget, report, trial_dir, seed=seed, policy=policy)
    if "fid" not in out:
        raise ValueError("train_fn must return a dict with 'fid' (final FID against the originals)")
    if not math.isfinite(float(out["fid"])):
        raise ValueError(f"the proxy training of {key} (seed {seed}) ended with FID {out['fid']}: it diverged or "
                         "produced non-finite images; this run counts as failed")
    feats = out.get("sample_features")
    if feats is None and out.get("samples") is not None:
        feats = extract(make_extractor(extractor_name, weights), out["samples"])
    if feats is not None:
        buf = io.BytesIO()
        np.save(buf, np.asarray(feats, dtype=np.float32))
        store.write_bytes(buf.getvalue(), *_samples_path(key, seed))
    final_step = max([budget, *steps])
    kid = out.get("kid")
    store.write_json({"subset": key, "augmentations": augmentations, "policy": policy, "seed": seed,
                      "fid": float(out["fid"]), "kid": None if kid is None else float(kid), "steps": steps, "fids": fids, "final_step": final_step,
                      "budget_steps": budget, "has_samples": feats is not None}, *_run_path(key, seed))
    tune.report({"step": final_step, INTERMEDIATE: float(out["fid"]), OBJECTIVE: float(out["fid"]), **tags})


class _Watch(tune.Callback):
    """Driver side: every trial's history (stopped ones included) and a hook per ended trial."""

    def __init__(self, on_trial: Callable[[dict, list[dict], str], None] | None):
        self.history: dict[str, list[dict]] = {}
        self.on_trial = on_trial

    def __getstate__(self):
        return {**self.__dict__, "on_trial": None}   # see stage1._Forward

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.history.setdefault(trial.trial_id, []).append(
            {k: result.get(k) for k in ("step", INTERMEDIATE, OBJECTIVE, "subset", "seed")})

    def on_trial_complete(self, iteration, trials, trial, **info):
        if self.on_trial:
            self.on_trial(trial.config, self.history.get(trial.trial_id, []), "")

    def on_trial_error(self, iteration, trials, trial, **info):
        if self.on_trial:
            self.on_trial(trial.config, self.history.get(trial.trial_id, []), str(getattr(trial, "error_msg", "")
                                                                                    or "the trial raised"))


def _collect(treatment: Treatment, seed: int, history: list[dict], store: SearchStore, error: str) -> ValidatedRun:
    run = ValidatedRun(treatment.key, treatment.augmentations, treatment.policy, treatment.role, seed, "failed",
                       error=error[:2000])
    if store.exists(*_run_path(treatment.key, seed)):
        rec = store.read_json(*_run_path(treatment.key, seed))
        run.status, run.fid, run.steps, run.fids = "finished", rec["fid"], rec["steps"], rec["fids"]
        run.kid = rec.get("kid")   # None for a run stored before KID, or a train_fn that gives none
        return run
    pairs = [(int(h["step"]), float(h[INTERMEDIATE])) for h in history
             if h.get("step") is not None and h.get(INTERMEDIATE) is not None]
    run.steps, run.fids = [s for s, _ in pairs], [f for _, f in pairs]
    if pairs and not error:
        run.status = "stopped"
    return run


# A leak must exceed the noise of KID itself: an augmented copy of rotation-invariant data (the crater
# fields) has nearly the originals' distribution, and two equal-in-truth KIDs differ by estimation noise.
LEAK_Z = 2.0               # margin: this many standard deviations of the paired difference (see leak_check)
LEAK_SUBSETS = 100


def leak_check(sample_features: np.ndarray, originals_features: np.ndarray,
               augmented_features: Mapping[str, list[np.ndarray]]) -> tuple[list[str], dict[str, Any]]:
    """Members whose augmented copies are closer to the generator's samples than the originals are,
    by KID, beyond a noise margin. KID, not FID: it has no sample-size bias, so a few hundred
    generated samples compare fairly.

    The noise: the same half-size subsets of the samples are scored against half-size subsets of the
    originals and of each copy (paired: the same seed draws the same sample subsets, the copy having
    the originals' count), giving differences d_s = MMD²(samples_s, originals_s) - MMD²(samples_s,
    copy_s). Half-size subsets drawn without replacement from n spread around the full estimate by
    about the full estimate's own standard error (variance 2s²/n times the finite-population
    factor 1 - m/n = 1/2, i.e. s²/n), so the margin LEAK_Z x std(d) is a two-standard-error rule.
    (Full-size subsets cannot measure it: with at most 1000 images a side every subset is the
    whole set and their spread is 0.) A member leaks when KID(samples, originals) - KID(samples,
    copy) > margin. FIDs are kept beside it."""
    g = Gaussian(sample_features)
    to_orig = kid_with_std(originals_features, sample_features)[0]
    half = max(2, min(sample_features.shape[0], originals_features.shape[0], SUBSET_SIZE) // 2)
    orig_halves = kid_subset_values(originals_features, sample_features, subsets=LEAK_SUBSETS, subset_size=half)
    report: dict[str, Any] = {"kid_samples_originals": to_orig, "samples": int(sample_features.shape[0]),
                              "fid_samples_originals": fid_gaussians(g, Gaussian(originals_features))}
    leaks, margins = [], []
    for name, feats in augmented_features.items():
        kid = float(np.mean([kid_with_std(f, sample_features)[0] for f in feats]))
        diffs = np.concatenate([orig_halves - kid_subset_values(f, sample_features, subsets=LEAK_SUBSETS,
                                                                 subset_size=half) for f in feats])
        margin = LEAK_Z * float(diffs.std(ddof=1))
        margins.append(margin)
        report[f"kid_samples_{name}"], report[f"margin_{name}"] = kid, margin
        report[f"fid_samples_{name}"] = float(np.mean([fid_gaussians(g, Gaussian(f)) for f in feats]))
        if to_orig - kid > margin:
            leaks.append(name)
    report["margin"] = max(margins) if margins else 0.0
    return leaks, report


def decide(runs: Sequence[ValidatedRun], labels: dict[str, str], stage1_choice: Sequence[str], *,
           alpha: float, seed: int, budget_steps: int, n_seeds: int
           ) -> tuple[list[str], str, str, str, str | None, list[Comparison]]:
    """(chosen, source, reason, verdict sentence, winner key, comparisons): see the module docstring."""
    by_key: dict[str, dict[int, float]] = {}
    for r in runs:
        if r.status == "finished" and r.fid is not None:
            by_key.setdefault(r.key, {})[r.seed] = r.fid
    none = by_key.pop(NONE_KEY, {})
    complete = {k: v for k, v in by_key.items() if len(v) >= n_seeds}   # only subsets run at every seed
    stage1_key = subset_key(stage1_choice)
    if not none:
        sentence = ("No verdict: the no-augmentation control did not finish, so nothing says whether any subset "
                    "beats plain data.")
        return list(stage1_choice), "stage1", f"kept stage 1's choice {stage1_key}. {sentence}", sentence, None, []
    comparisons = compare_with_none(complete, none, labels, alpha=alpha, seed=seed)
    if n_seeds < 2:
        # One pair per subset: the bootstrap interval is a point, no noise estimate at all.
        for c in comparisons:
            c.beats_none = False
        sentence = (f"No verdict with one seed (search.validate.seeds=1): a single paired difference carries no "
                    f"noise estimate, so no subset is named as beating plain data at this budget ({budget_steps} steps).")
        return (list(stage1_choice), "stage1", f"kept stage 1's choice {stage1_key} (search.select). {sentence}",
                sentence, None, comparisons)
    winners = [c for c in comparisons if c.beats_none and c.key != TRIVIAL_KEY]
    trivial = next((c for c in comparisons if c.key == TRIVIAL_KEY and c.beats_none), None)
    if winners:
        best = min(winners, key=lambda c: (c.mean, c.key))
        sentence = winner_sentence(best)
        return list(members_of(best.key)), "stage2", f"stage 2 winner {best.key}. {sentence}", sentence, best.key, comparisons
    sentence = no_winner_sentence(budget_steps, n_seeds)
    if trivial:
        sentence += (f" The TrivialAugment-style control did beat it (FID {trivial.mean:+.4g}, interval "
                     f"[{trivial.low:.4g}, {trivial.high:.4g}]), which a fixed subset cannot express.")
    return (list(stage1_choice), "stage1", f"kept stage 1's choice {stage1_key} (search.select). {sentence}",
            sentence, None, comparisons)


def run_stage2(ctx: SearchContext, *, top: Sequence[str], kept: Sequence[str] | None = None,
               singles: Sequence[str], best_set: Sequence[str], stage1_choice: Sequence[str],
               proxy: Callable[[Sequence[str]], float], augmented_features: Callable[[str], list[np.ndarray]],
               on_run: Callable[[ValidatedRun], None] | None = None) -> ValidationResult:
    from optuna.samplers import TPESampler
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from search.proposal_searcher import ProposalSearch

    if ctx.train_fn is None:
        raise ValueError("run_stage2: the context has no train_fn")
    cfg, store, log, resources = ctx.config, ctx.store, ctx.say, ctx.stage2_resources
    v = cfg.validate_
    k, budget = cfg.k, v.budget_steps
    top, kept = list(top), list(kept if kept is not None else top)
    seeds = seed_list(cfg.seed, v.seeds)
    limit = concurrency_limit(resources, cfg.concurrency)
    ctrl = controls(kept, singles, best_set, singles_rule(cfg), best_set_rule(cfg))
    treatments = {t.key: t for t in ctrl}
    runs: dict[tuple[str, int], ValidatedRun] = {}

    def ended(config: dict, history: list[dict], error: str) -> None:
        config = config.get("run", config)
        key = config["subset"]
        t = treatments.get(key) or Treatment(key, members_of(key), EXPAND, "proposal", "Optuna proposal")
        treatments.setdefault(key, t)
        run = _collect(t, int(config.get("seed", seeds[0])), history, store, error)
        if t.policy == EXPAND and run.augmentations:
            run.proxy_fid = proxy(run.augmentations)
        old = runs.get((key, run.seed))
        if old is None or old.status != "finished":
            runs[(key, run.seed)] = run
        log(f"stage 2: {key} seed {run.seed}: {run.status}" + (f", trained FID {run.fid:.4g}" if run.fid is not None else ""))
        if on_run:
            on_run(run)

    payload = (ctx.train_fn, kept, budget, store, ctx.extractor, ctx.extractor_weights, dict(resources), seeds[0])
    # Trials get these values, never the context: its tracker and originals stay on the driver (store: see stage1).
    trainable = tune.with_resources(tune.with_parameters(_trial, payload=payload),
                                    {"cpu": resources["CPU"], "gpu": resources.get("GPU", 0.0)})
    path, fs = store.tune_storage()

    def fit(name: str, param_space: dict, tune_config: tune.TuneConfig) -> None:
        tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config,
                           run_config=tune.RunConfig(name=f"stage2-{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                                                     storage_path=path, storage_filesystem=fs, verbose=0,
                                                     callbacks=[_Watch(ended), CSVLoggerCallback(), JsonLoggerCallback()]))
        with _tune_env():
            tuner.fit()

    # 1. Controls: every seed, full budget, no scheduler.
    grid = [{"subset": t.key, "seed": s, "policy": t.policy} for t in ctrl for s in seeds]
    log(f"stage 2: controls {', '.join(t.key for t in ctrl)} × seeds {seeds}, {budget} steps each, never stopped "
        f"early, up to {limit} at once")
    fit("controls", {"run": tune.grid_search(grid)}, tune.TuneConfig(max_concurrent_trials=limit, reuse_actors=True))

    # 2. Proposals: one categorical over valid non-control subsets, halving among proposals only.
    choices = proposal_choices(top, k, [t.augmentations for t in ctrl if t.policy == EXPAND])
    halving = RecordedHalving(time_attr="step", metric=INTERMEDIATE, budget_steps=budget)
    study = proposal_study(store)
    done, queued = _replay_study(study, store, seeds[0], ended)
    n_proposals = min(v.trials, len(choices)) - len(done)
    if done:
        log(f"stage 2: {len(done)} proposal(s) of the stored Optuna study replayed, not rerun")
    if n_proposals > 0:
        # With room for every choice, each is tried once (in order); else TPE samples the categorical.
        points = ([{"subset": c} for c in choices if c not in set(done) | queued] if v.trials >= len(choices)
                  else [])
        searcher = ProposalSearch(metric=OBJECTIVE, mode="min", points_to_evaluate=points or None,
                                  sampler=TPESampler(seed=cfg.seed), study_name=STUDY_NAME, storage=study.storage)
        log(f"stage 2: {n_proposals} Optuna proposal(s) among {len(choices)} valid subsets of 1..{k} of the top "
            f"{len(top)} ({', '.join(top)}), seed {seeds[0]}, halving at steps {halving.rungs} "
            f"(grace {grace_steps(budget)})")
        fit("proposals", {"subset": tune.choice(choices)},
            tune.TuneConfig(search_alg=searcher, scheduler=halving, num_samples=n_proposals,
                            max_concurrent_trials=limit, reuse_actors=True))

    # 3. Confirmation: the best finished proposal on the remaining seeds, full budget.
    finished = [r for r in runs.values() if r.role == "proposal" and r.status == "finished" and r.seed == seeds[0]]
    best_proposal = min(finished, key=lambda r: (r.fid, r.key)) if finished else None
    if best_proposal is not None:
        treatments[best_proposal.key] = Treatment(best_proposal.key, best_proposal.augmentations, EXPAND, "proposal",
                                                  "best Optuna proposal, confirmed on every seed")
        if len(seeds) > 1:
            log(f"stage 2: confirming the best proposal {best_proposal.key} on seeds {seeds[1:]}")
            fit("confirm", {"run": tune.grid_search([{"subset": best_proposal.key, "seed": s, "policy": EXPAND}
                                                     for s in seeds[1:]])},
                tune.TuneConfig(max_concurrent_trials=limit, reuse_actors=True))

    all_runs = sorted(runs.values(), key=lambda r: (r.status != "finished", r.key, r.seed))
    if not any(r.status == "finished" for r in all_runs):
        raise RuntimeError("every stage-2 trial failed:\n  " + "\n  ".join(r.error or r.key for r in all_runs[:5]))
    labels = {key: t.label for key, t in treatments.items()}
    chosen, source, reason, verdict, winner, comparisons = decide(
        all_runs, labels, stage1_choice, alpha=v.alpha, seed=cfg.seed, budget_steps=budget, n_seeds=len(seeds))
    agreement = agreement_by_size(_agreement_points(all_runs), seed=cfg.seed)
    warning = " ".join(a.warning for a in agreement if a.warning)
    leaks, leak_report = _leaks(ctx, store, chosen, all_runs, augmented_features)
    return ValidationResult(trained=trained_summary(all_runs), runs=all_runs, chosen=chosen, source=source, reason=reason, verdict=verdict, winner=winner,
                            comparisons=comparisons, correction=CORRECTION.format(alpha=v.alpha), agreement=agreement,
                            rungs=halving.summary(), rung_decisions=halving.record(), warning=warning,
                            leaks=leaks, leak_report=leak_report)


STUDY_NAME = "stage2-proposals"


def trained_summary(runs: Sequence[ValidatedRun]) -> dict[str, dict[str, Any]]:
    """Per subset key: trained FID and KID, mean and spread (sample std) over its finished seeds;
    KID is None where no run reported one."""
    out: dict[str, dict[str, Any]] = {}
    for key in sorted({r.key for r in runs}):
        done = [r for r in runs if r.key == key and r.status == "finished" and r.fid is not None]
        if not done:
            continue
        fids = [r.fid for r in done]
        kids = [r.kid for r in done if r.kid is not None]
        out[key] = {"seeds": [r.seed for r in done], "fid": float(np.mean(fids)), "fid_std": spread(fids),
                    "kid": float(np.mean(kids)) if kids else None, "kid_std": spread(kids) if kids else None}
    return out


@dataclass
class _Study:
    storage: Any          # an optuna storage, or None (in memory)
    trials: list          # the stored study's trials (FrozenTrial), empty for a new one


def proposal_study(store: SearchStore) -> _Study:
    """The proposals' Optuna study, in `optuna.db` beside the search, so that `--resume` continues it
    (and optuna-dashboard opens it); in memory for a remote store."""
    import optuna

    url = store.optuna_storage()
    if url is None:
        return _Study(None, [])
    storage = optuna.storages.RDBStorage(url)
    try:
        trials = optuna.load_study(study_name=STUDY_NAME, storage=storage).trials
    except KeyError:   # no such study yet
        trials = []
    return _Study(storage, trials)


def _replay_study(study: _Study, store: SearchStore, seed: int,
                  ended: Callable[[dict, list[dict], str], None]) -> tuple[list[str], set[str]]:
    """(the subsets of the stored study's ended trials, one per trial, each reported again: finished
    ones from their stored run, the others as stopped or failed; the subsets still queued in it)."""
    import optuna

    ended_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    done, queued = [], set()
    for t in study.trials:
        key = t.params.get("subset") or (t.system_attrs.get("fixed_params") or {}).get("subset")
        if key is None:
            continue
        if t.state == optuna.trial.TrialState.WAITING:
            queued.add(key)   # enqueued by the interrupted run: Optuna asks these first
            continue
        if t.state not in ended_states:
            continue
        done.append(key)
        history = [] if store.exists(*_run_path(key, seed)) else [{"step": 0, INTERMEDIATE: math.inf}]
        ended({"subset": key, "seed": seed}, history, "failed before" if t.state == ended_states[2] else "")
    return done, queued


def _agreement_points(runs: Sequence[ValidatedRun]) -> list[tuple[int, float, float]]:
    """(size, mixture FID, mean trained FID over full-budget seeds) of every non-empty expanded subset."""
    by_key: dict[str, list[ValidatedRun]] = {}
    for r in runs:
        if r.policy == EXPAND and r.augmentations and r.status == "finished" and r.proxy_fid is not None:
            by_key.setdefault(r.key, []).append(r)
    return [(len(rs[0].augmentations), rs[0].proxy_fid, float(np.mean([r.fid for r in rs]))) for rs in by_key.values()]


class _ReadWhenAsked(Mapping):
    """name -> a candidate's augmented features, read from the store when asked: leak_check goes
    through the members one by one, so the driver holds one member's features, not all of them."""

    def __init__(self, names: Sequence[str], load: Callable[[str], list[np.ndarray]]):
        self.names, self.load = list(names), load

    def __getitem__(self, name: str) -> list[np.ndarray]:
        if name not in self.names:
            raise KeyError(name)
        return self.load(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _leaks(ctx: SearchContext, store: SearchStore, chosen: Sequence[str], runs: Sequence[ValidatedRun],
           augmented_features: Callable[[str], list[np.ndarray]]) -> tuple[list[str], dict[str, Any]]:
    key = subset_key(chosen)
    seeds = sorted(r.seed for r in runs if r.key == key and r.status == "finished")
    if seeds and chosen and store.exists(*_samples_path(key, seeds[0])):
        samples = np.load(io.BytesIO(store.read_bytes(*_samples_path(key, seeds[0]))))
        leaks, report = leak_check(samples, ctx.originals.features, _ReadWhenAsked(chosen, augmented_features))
        return leaks, {**report, "checked": True, "seed": seeds[0]}
    return [], {"checked": False, "why_not": "the chosen subset's proxy training returned no samples "
                                             "(or the chosen subset was not trained)"}


def _tune_env():
    """Two Tune settings for the stage-2 runs only, restored after them:
    - intermediate results carry the halving metric and the objective is +inf until the end, so
      Tune's strict check (every result carries every metric) does not fit; it is switched off;
    - the automatic TensorBoard logger, which warns at every +inf objective, is not added (the CSV
      and JSON loggers are passed explicitly)."""
    return environ_set({"TUNE_DISABLE_STRICT_METRIC_CHECKING": "1", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"})
