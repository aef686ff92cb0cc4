"""`run_search`: the whole MineAug search, as `jobs` calls it for `orbitgen search mineaug`.

    result = run_search(
        "builtin:craters?count=512&seed=0",      # shard URL (file://, s3://, builtin:...) or an Originals
        channels=1, resolution=32,               # resolution only matters for builtin: URLs
        extractor="randconv", extractor_weights=None,
        config={"k": 3, "repeats": 3},           # the spec's `search:` section (dict or SearchConfig)
        tracking_uri="sqlite:///mlflow.db", experiment="quickstart", name="quickstart-search-1",
        storage="/work/runs/search/quickstart-search-1",   # this search's folder (path or fsspec URL)
        resume=False,                            # True: continue the search stored there
        train_fn=None,                           # needed when validate.top_m > 0 (see search.validate)
        progress=print,
    )
    result.chosen, result.parent_run_id, result.table

Steps: the feature space resolved (search.features or the caller's extractor; search.preset=paper
is Inception-v3, refused in one line without its weights file) -> originals read and featurised
once (driver) -> stage 1, one Ray Tune trial per candidate (search.stage1: FID, KID, MSE) ->
ranking with MSE gate, near-duplicate groups and ties (search.select) -> every K-subset of the
kept candidates scored as an expanded mixture from cached features (and a mixture KID for the K
best singles and for the SUBSET_KID_ROWS best K-sets, beside their FID in subsets.csv) ->
optional stage 2 (search.validate: controls at every seed, Optuna proposals under successive
halving, a verdict against plain data with Holm-corrected paired bootstrap intervals) -> MLflow
parent run with ranking.csv, subsets.csv, a FID bar chart, a contact sheet, stage 2's
verdict.csv / trained.csv / rungs.csv / rank_agreement.csv / param_importances.csv
(search.param_importances, once enough proposals finished), Optuna's plots (search.study_plots:
PNG; HTML only where plotly is installed), and the chosen list, the rule that chose it
(search.labels) and the verdict as tags (search.tracking, search.stage2_tracking). The originals
never include the `holdout` split.

Errors in the inputs raise `SearchConfigError` whose message starts with the spec field
(`search.k: ...`), before anything is written; Ray is used as connected (`ray.init()` on the
local machine when nothing is).
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from models.augment.pool import apply_uint8
from search.config import SearchConfig, SearchConfigError, load_config, resolve_candidates, stage1_features
from search.context import SearchContext, TrainFn
from search.frechet import Reference
from search.originals import Originals, load_originals, resolve_url
from search.plots import contact_sheet, fid_bar_chart
from search.labels import best_set_rule, features_note, singles_rule, stage1_rule
from search.scoring import CandidateScore, repeat_seed, with_kids
from search.gate_message import too_few_kept
from search.select import (RankRow, SubsetRow, add_mixture_kids, best_singles, mixture_fid, mixture_kid,
                           mixture_table, rank_candidates, rank_subsets, screening_note)
from search.stage1 import run_stage1
from search.store import SearchStore
from search.tracking import (RANKING_COLUMNS, TAG_CHOSEN, TAG_SELECT, SearchTracker, format_ranking, write_csv)
from search.stage2_tracking import TAG_VERDICT, log_stage2_run, stage2_artifacts, stage2_metrics
from search.validate import STUDY_NAME, ValidationResult, run_stage2
from search.param_importances import (finished_trials, importances_csv, importances_line, param_importances,
                                      too_few_line)

# kid/kid_std last, so a reader of the former columns by position still finds them where they were.
SUBSET_COLUMNS = ("rank", "augmentations", "fid", "fid_std", "fids", "exact", "kid", "kid_std")
# What must match for a resumed search to reuse stored trials.
_RESUME_KEYS = ("candidates", "repeats", "seed", "max_images")
_STATE_FIELDS = {"data": "data.train", "channels": "data.channels", "extractor": "search.features (or eval.fid_extractor)",
                 "holdout": "data.holdout", "resolution": "data.resolution", "extractor_weights": "eval.inception_weights"}


@dataclass
class SearchResult:
    name: str
    parent_run_id: str
    experiment_id: str
    ranking: list[RankRow]
    subsets: list[SubsetRow]
    singles: list[str]                 # the published choice: K best kept singles
    singles_fid: float                 # their mixture FID
    best_set: list[str]                # the best K-set by mixture FID
    best_set_fid: float
    chosen: list[str]                  # what goes into augment.mineaug
    select: str
    reason: str
    validation: ValidationResult | None = None
    stage1_ran: list[str] = field(default_factory=list)
    stage1_reused: list[str] = field(default_factory=list)
    seconds: float = 0.0
    singles_kid: tuple[float, float] = (float("nan"), float("nan"))    # (mixture KID, spread over repeats)
    best_set_kid: tuple[float, float] = (float("nan"), float("nan"))
    singles_rule: str = ""             # which rule produced each list (search.labels)
    best_set_rule: str = ""
    chosen_rule: str = ""
    features_note: str = ""            # the feature space, and whether it is the paper's

    @property
    def verdict(self) -> str:
        """Stage 2's plain-words verdict ("" without stage 2): goes into the run and the written spec."""
        return self.validation.verdict if self.validation else ""

    @property
    def table(self) -> str:
        return format_ranking([r.as_csv() for r in self.ranking], self.chosen)


def _ensure_ray() -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)


def _check_resume(store: SearchStore, state: dict, resume: bool) -> dict | None:
    if not resume:
        if store.has_any_state():
            raise SearchConfigError(f"search name: {store.url} already holds a search; resume it or pick another name")
        return None
    if not store.has_any_state():
        raise SearchConfigError(f"--resume: no search to resume in {store.url}")
    old = store.read_json("search.json")
    diff = [k for k in _RESUME_KEYS if old["config"].get(k) != state["config"].get(k)]
    diff += [k for k in ("data", "channels", "extractor") if old.get(k) != state.get(k)]
    # Recorded since the verdict work: a search stored before then is not refused for lacking them.
    diff += [k for k in ("holdout", "resolution", "extractor_weights") if k in old and old[k] != state.get(k)]
    if diff:
        field = f"search.{diff[0]}" if diff[0] in _RESUME_KEYS else _STATE_FIELDS.get(diff[0], diff[0])
        raise SearchConfigError(f"{field}: differs from the stored search in {store.url} "
                                f"({', '.join(diff)} changed); a resumed search must score the same thing")
    return old


def run_search(originals: str | Originals, *, channels: int, config: dict | SearchConfig | None,
               tracking_uri: str, experiment: str, name: str, storage: str,
               extractor: str = "randconv", extractor_weights: str | None = None, resolution: int | None = None,
               resume: bool = False, train_fn: TrainFn | None = None,
               progress: Callable[[str], None] | None = print, parent_tags: dict[str, str] | None = None,
               validate_resources: dict[str, float] | None = None, holdout: float | int | None = None
               ) -> SearchResult:
    start = time.perf_counter()
    say = progress or (lambda s: None)
    cfg = load_config(config)
    candidates = resolve_candidates(cfg, channels)
    if cfg.k > len(candidates):
        raise SearchConfigError(f"search.k: {cfg.k} is more than the {len(candidates)} candidates")
    if cfg.validate_.top_m > 0 and train_fn is None:
        raise SearchConfigError("search.validate.top_m: stage 2 needs a training function; none was given")
    if 0 < cfg.validate_.top_m < cfg.k:
        raise SearchConfigError(f"search.validate.top_m: {cfg.validate_.top_m} is below search.k={cfg.k}")
    # search.features (or eval's extractor); Inception without its weights file stops here, in one line.
    extractor, extractor_weights = stage1_features(cfg, extractor, extractor_weights)
    store = SearchStore(storage)
    data = originals.url if isinstance(originals, Originals) else str(originals)
    state = {"config": cfg.to_dict(), "data": data, "channels": channels, "extractor": extractor, "name": name,
             "holdout": holdout, "resolution": resolution, "extractor_weights": extractor_weights}
    old = _check_resume(store, state, resume)

    tracker = SearchTracker(tracking_uri, experiment, name)
    parent = tracker.open_parent(old.get("parent_run_id") if old else None, parent_tags)
    store.write_json({**state, "parent_run_id": parent}, "search.json")
    say(f"MineAug search {name}: MLflow parent run {parent} (experiment {experiment})")
    try:
        read = _read_originals(originals, cfg=cfg, channels=channels, resolution=resolution, extractor=extractor,
                               weights=extractor_weights, store=store, say=say, holdout=holdout)
        ctx = SearchContext(config=cfg, candidates=candidates, channels=channels, originals=read, extractor=extractor,
                            extractor_weights=extractor_weights, store=store, tracker=tracker, parent_run_id=parent,
                            name=name, train_fn=train_fn, say=say, validate_resources=validate_resources)
        result = _search(ctx)
    except BaseException as exc:
        tracker.finish(parent, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    result.seconds = time.perf_counter() - start
    tracker.log(parent, metrics={"seconds": result.seconds})
    tracker.finish(parent)
    say(f"chosen ({result.chosen_rule}): {', '.join(result.chosen)}")   # the caller prints `result.table`
    return result


def _read_originals(source: str | Originals, *, cfg: SearchConfig, channels: int, resolution: int | None,
                    extractor: str, weights: str | None, store: SearchStore, say: Callable[[str], None],
                    holdout: float | int | None = None) -> Originals:
    if isinstance(source, Originals):
        return source
    url = resolve_url(source, os.path.join(store.path, "shards") if store.url.startswith("file://")
                      else store.url + "/shards", resolution, channels)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_originals(url, channels, extractor, weights, cfg.max_images, device, say, holdout=holdout)


def _search(ctx: SearchContext) -> SearchResult:
    cfg, candidates, originals, store, tracker = ctx.config, ctx.candidates, ctx.originals, ctx.store, ctx.tracker
    parent, say = ctx.parent_run_id, ctx.say
    tracker.log(parent, params={**{f"search.{k}": v for k, v in cfg.to_dict().items()},
                                "data": originals.url, "images": originals.count, "channels": ctx.channels,
                                "extractor": originals.extractor_name, "candidates": len(candidates)},
                tags={"orbitgen.data_fingerprint": originals.fingerprint} if originals.fingerprint else None)
    say(features_note(ctx.extractor, originals.extractor_name))
    _ensure_ray()
    reference = Reference(originals.features)
    for n in candidates:
        tracker.child(n, stage=1)

    # A resumed search counts on from its finished trials; each candidate is counted once, so the
    # lines of finished trials replayed at the end do not count past the total.
    reported = {n for n in candidates if store.stage1_done(n)}

    def on_result(score: CandidateScore) -> None:
        reported.add(score.name)
        run_id, _ = tracker.child(score.name, stage=1)
        if not tracker.has_metric(run_id, "fid"):   # a resumed search never logs a trial twice
            tracker.log(run_id, params={"candidate": score.name, "repeats": len(score.fids)},
                        metrics={"fid": score.fid, "fid_std": score.fid_std, "mse": score.mse,
                                 "mse_std": score.mse_std, "seconds": score.seconds,
                                 **({"kid": score.kid, "kid_std": score.kid_std} if score.kids else {})},
                        step_metrics=[("fid_repeat", f, r) for r, f in enumerate(score.fids)]
                        + [("mse_repeat", m, r) for r, m in enumerate(score.mses)])
        say(f"  [{len(reported):>{len(str(len(candidates)))}}/{len(candidates)}] {score.name:20s} FID {score.fid:.4g} ± {score.fid_std:.2g}  KID {score.kid:.3g} ± {score.kid_std:.2g}  MSE {score.mse:.4g}  ({score.seconds:.1f}s)")

    scores, ran = run_stage1(originals, candidates, repeats=cfg.repeats, seed=cfg.seed, extractor=ctx.extractor,
                             weights_path=ctx.extractor_weights, store=store, resources=cfg.resources_per_trial,
                             concurrency=cfg.concurrency, reference=reference, on_result=on_result, log=say,
                             with_features=False)
    # The scores hold no features: each step below reads a candidate's from the store when it needs
    # them and drops them before the next (all of them: 1.6 GB at the paper's scale, issue 23 item 8).
    features = store.load_features
    scores = {n: with_kids(sc, originals.features, features) for n, sc in scores.items()}   # stored before KID
    for n in candidates:
        if n not in ran:
            on_result(scores[n])   # finished before a restart: its child run may lack the metrics

    ranking = rank_candidates(scores, cfg.mse_min, cfg.dedupe, features=features)
    for row in ranking:
        run_id, _ = tracker.child(row.augmentation, stage=1)
        tracker.log(run_id, metrics={"kept": float(row.kept)},
                    tags={"orbitgen.search.reason": row.reason} if row.reason else None)
        tracker.finish(run_id)
    kept = [r.augmentation for r in ranking if r.kept]
    if cfg.k > len(kept):
        raise SearchConfigError(too_few_kept(ranking, cfg.k, cfg.mse_min, ctx.name))
    table = mixture_table(reference, scores, kept, features)
    t0 = time.perf_counter()
    subsets = rank_subsets(table, kept, cfg.k)
    say(f"ranked {len(subsets)} {cfg.k}-subsets of {len(kept)} kept candidates by mixture FID in "
        f"{time.perf_counter() - t0:.2f}s")
    if note := screening_note(subsets):
        say("WARNING: " + note)
    singles = best_singles(ranking, cfg.k)
    singles_fid, _ = mixture_fid(table, kept, singles)
    best_set, best_set_fid = list(subsets[0].augmentations), subsets[0].fid
    t0 = time.perf_counter()
    with_kid = add_mixture_kids(subsets, originals.features, scores, features=features)
    if with_kid:
        say(f"mixture KID of the {with_kid} best {cfg.k}-subsets in {time.perf_counter() - t0:.2f}s (subsets.csv)")
    singles_kid = mixture_kid(originals.features, scores, singles, features=features)
    best_set_kid = ((subsets[0].kid, subsets[0].kid_std) if np.isfinite(subsets[0].kid)
                    else mixture_kid(originals.features, scores, best_set, features=features))
    chosen = singles if cfg.select == "singles" else best_set
    chosen_rule = stage1_rule(cfg)
    reason = (f"stage 1, {chosen_rule}; singles {'+'.join(singles)} mixture FID {singles_fid:.4g}, best set "
              f"{'+'.join(best_set)} {best_set_fid:.4g}")

    validation = None
    if cfg.validate_.top_m > 0:
        top = kept[:cfg.validate_.top_m]

        def proxy(subset) -> float:
            return mixture_fid(table, kept, list(subset))[0]

        validation = run_stage2(ctx, top=top, kept=kept, singles=singles, best_set=best_set, stage1_choice=chosen,
                                proxy=proxy, augmented_features=features,
                                on_run=lambda run: log_stage2_run(tracker, run, cfg.validate_.budget_steps))
        chosen, reason = validation.chosen, f"stage 2: {validation.reason}"
        if validation.winner:
            chosen_rule = "stage 2: it beat no augmentation beyond seed noise (Holm-corrected paired bootstrap)"
        else:
            chosen_rule = f"{chosen_rule}; stage 2 found no subset beating no augmentation"
        say("verdict: " + validation.verdict)
        if validation.warning:
            say("WARNING: " + validation.warning)
        if validation.leaks:
            lr = validation.leak_report
            say("WARNING: leak check: by KID, the proxy generator's samples are closer to the augmented copies of "
                f"{', '.join(validation.leaks)} than to the originals (KID to originals "
                f"{lr.get('kid_samples_originals', float('nan')):.3g}, margin {lr.get('margin', float('nan')):.2g}, "
                f"{lr.get('samples', '?')} samples)")

    table.close()   # its matrices' files on local disk, at the paper's scale (search.set_matrices)
    result = SearchResult(name=ctx.name, parent_run_id=parent, experiment_id=tracker.experiment_id, ranking=ranking,
                          subsets=subsets, singles=singles, singles_fid=singles_fid, best_set=best_set,
                          best_set_fid=best_set_fid, chosen=chosen, select=cfg.select, reason=reason,
                          validation=validation, stage1_ran=ran, stage1_reused=[n for n in candidates if n not in ran],
                          singles_kid=singles_kid, best_set_kid=best_set_kid, singles_rule=singles_rule(cfg),
                          best_set_rule=best_set_rule(cfg), chosen_rule=chosen_rule,
                          features_note=features_note(ctx.extractor, originals.extractor_name))
    _report(ctx, result)
    return result


def _report(ctx: SearchContext, result: SearchResult) -> None:
    """The parent run's artifacts, metrics and tags, and the same tables in the search's folder."""
    import json

    cfg, originals, res, validation = ctx.config, ctx.originals, result, result.validation
    with tempfile.TemporaryDirectory() as tmp:
        files = {"ranking.csv": write_csv([r.as_csv() for r in res.ranking], RANKING_COLUMNS),
                 "subsets.csv": write_csv([s.as_csv() for s in res.subsets], SUBSET_COLUMNS),
                 "summary.json": json.dumps({"chosen": res.chosen, "select": res.select, "reason": res.reason,
                                             "singles": res.singles, "singles_fid": res.singles_fid,
                                             "best_set": res.best_set, "best_set_fid": res.best_set_fid,
                                             "config": cfg.to_dict(), "extractor": originals.extractor_name,
                                             "images": originals.count,
                                             "verdict": res.verdict, "singles_kid": res.singles_kid,
                                             "best_set_kid": res.best_set_kid, "singles_rule": res.singles_rule,
                                             "best_set_rule": res.best_set_rule, "chosen_rule": res.chosen_rule,
                                             "features_note": res.features_note,
                                             "validation": validation.summary() if validation else None},
                                            indent=1, default=str)}
        if validation:
            files.update(stage2_artifacts(validation))
            study_url = ctx.store.optuna_storage()
            found = param_importances(study_url, STUDY_NAME)
            if found is not None:
                files["param_importances.csv"] = importances_csv(*found)
                ctx.say(importances_line(*found))
            elif study_url is not None:
                ctx.say(too_few_line(len(finished_trials(study_url, STUDY_NAME))))
        for fname, text in files.items():
            with open(os.path.join(tmp, fname), "w", encoding="utf-8") as f:
                f.write(text)
        fid_bar_chart(res.ranking, res.chosen, os.path.join(tmp, "fid_bar.png"))
        few = originals.images[:6]
        contact_sheet(few, [(r.augmentation, apply_uint8(r.augmentation, few, originals.channels,
                                                         repeat_seed(cfg.seed, r.augmentation, 0)))
                            for r in res.ranking], os.path.join(tmp, "contact_sheet.png"))
        pictures = ["fid_bar.png", "contact_sheet.png"]
        if validation:
            from search.study_plots import study_htmls, study_pngs

            pictures += [os.path.basename(p) for p in study_pngs(ctx.store.optuna_storage(), STUDY_NAME, tmp)]
            pictures += [os.path.basename(p) for p in study_htmls(ctx.store.optuna_storage(), STUDY_NAME, tmp)]
        for fname in (*files, *pictures):
            ctx.tracker.artifact(ctx.parent_run_id, os.path.join(tmp, fname))
        for fname in files:
            if fname.endswith((".csv", ".json")):
                ctx.store.write_bytes(files[fname].encode("utf-8"), fname)
    metrics = {"singles_mixture_fid": res.singles_fid, "best_set_mixture_fid": res.best_set_fid,
               "kept": float(sum(r.kept for r in res.ranking))}
    for label, (kid, _) in (("singles", res.singles_kid), ("best_set", res.best_set_kid)):
        if np.isfinite(kid):
            metrics[f"{label}_mixture_kid"] = kid
    if validation:
        metrics.update(stage2_metrics(validation))
    ctx.tracker.log(ctx.parent_run_id, metrics=metrics,
                    tags={TAG_CHOSEN: ",".join(res.chosen), TAG_SELECT: res.select,
                          "orbitgen.search.reason": res.reason[:5000], "orbitgen.search.singles": ",".join(res.singles),
                          "orbitgen.search.best_set": ",".join(res.best_set),
                          "orbitgen.search.chosen_rule": res.chosen_rule[:5000],
                          "orbitgen.search.features": res.features_note[:5000],
                          **({"orbitgen.search.stage": "2", "orbitgen.search.leaks": ",".join(validation.leaks),
                              TAG_VERDICT: validation.verdict[:5000],
                              "orbitgen.search.proxy_warning": validation.warning[:5000]} if validation else
                             {"orbitgen.search.stage": "1"})})
