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

Steps: originals read and featurised once (driver) -> stage 1, one Ray Tune trial per candidate
(search.stage1) -> ranking with MSE gate, near-duplicate groups and ties (search.select) ->
every K-subset of the kept candidates scored as an expanded mixture from cached features ->
optional stage 2 (search.validate) -> MLflow parent run with ranking.csv, subsets.csv, a FID
bar chart, a contact sheet and the chosen list as tags (search.tracking).

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
from search.config import SearchConfig, SearchConfigError, load_config, resolve_candidates
from search.frechet import Reference
from search.originals import Originals, load_originals, resolve_url
from search.plots import contact_sheet, fid_bar_chart
from search.scoring import CandidateScore, repeat_seed
from search.select import (RankRow, SubsetRow, best_singles, mixture_fid, mixture_table, rank_candidates,
                           rank_subsets)
from search.stage1 import run_stage1
from search.store import SearchStore
from search.tracking import (RANKING_COLUMNS, TAG_CHOSEN, TAG_SELECT, SearchTracker, format_ranking, write_csv)
from search.validate import TrainFn, ValidationResult, run_stage2

SUBSET_COLUMNS = ("rank", "augmentations", "fid", "fid_std", "fids", "exact")
# What must match for a resumed search to reuse stored trials.
_RESUME_KEYS = ("candidates", "repeats", "seed", "max_images")


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
    if diff:
        raise SearchConfigError(f"search.{diff[0]}: differs from the stored search in {store.url} "
                                f"({', '.join(diff)} changed); a resumed search must score the same thing")
    return old


def run_search(originals: str | Originals, *, channels: int, config: dict | SearchConfig | None,
               tracking_uri: str, experiment: str, name: str, storage: str,
               extractor: str = "randconv", extractor_weights: str | None = None, resolution: int | None = None,
               resume: bool = False, train_fn: TrainFn | None = None,
               progress: Callable[[str], None] | None = print, parent_tags: dict[str, str] | None = None,
               validate_resources: dict[str, float] | None = None) -> SearchResult:
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
    store = SearchStore(storage)
    data = originals.url if isinstance(originals, Originals) else str(originals)
    state = {"config": cfg.to_dict(), "data": data, "channels": channels, "extractor": extractor, "name": name}
    old = _check_resume(store, state, resume)

    tracker = SearchTracker(tracking_uri, experiment, name)
    parent = tracker.open_parent(old.get("parent_run_id") if old else None, parent_tags)
    store.write_json({**state, "parent_run_id": parent}, "search.json")
    say(f"MineAug search {name}: MLflow parent run {parent} (experiment {experiment})")
    try:
        result = _search(originals, cfg, candidates, channels, resolution, extractor, extractor_weights, store,
                         tracker, parent, name, train_fn, say, validate_resources)
    except BaseException as exc:
        tracker.finish(parent, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    result.seconds = time.perf_counter() - start
    tracker.log(parent, metrics={"seconds": result.seconds})
    tracker.finish(parent)
    say(f"chosen ({result.select}): {', '.join(result.chosen)}")   # the caller prints `result.table`
    return result


def _search(originals, cfg: SearchConfig, candidates, channels, resolution, extractor, weights, store: SearchStore,
            tracker: SearchTracker, parent: str, name: str, train_fn, say, validate_resources) -> SearchResult:
    if not isinstance(originals, Originals):
        url = resolve_url(originals, os.path.join(store.path, "shards") if store.url.startswith("file://")
                          else store.url + "/shards", resolution, channels)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        originals = load_originals(url, channels, extractor, weights, cfg.max_images, device, say)
    tracker.log(parent, params={**{f"search.{k}": v for k, v in cfg.to_dict().items()},
                                "data": originals.url, "images": originals.count, "channels": channels,
                                "extractor": originals.extractor_name, "candidates": len(candidates)},
                tags={"orbitgen.data_fingerprint": originals.fingerprint} if originals.fingerprint else None)
    _ensure_ray()
    reference = Reference(originals.features)
    for n in candidates:
        tracker.child(n, stage=1)

    finished = [sum(store.stage1_done(n) for n in candidates)]   # a resumed search counts on from its finished trials

    def on_result(score: CandidateScore) -> None:
        finished[0] += 1
        run_id, _ = tracker.child(score.name, stage=1)
        if not tracker.has_metric(run_id, "fid"):   # a resumed search never logs a trial twice
            tracker.log(run_id, params={"candidate": score.name, "repeats": len(score.fids)},
                        metrics={"fid": score.fid, "fid_std": score.fid_std, "mse": score.mse,
                                 "mse_std": score.mse_std, "seconds": score.seconds},
                        step_metrics=[("fid_repeat", f, r) for r, f in enumerate(score.fids)]
                        + [("mse_repeat", m, r) for r, m in enumerate(score.mses)])
        say(f"  [{finished[0]:>{len(str(len(candidates)))}}/{len(candidates)}] {score.name:20s} FID {score.fid:.4g} ± {score.fid_std:.2g}  MSE {score.mse:.4g}  ({score.seconds:.1f}s)")

    scores, ran = run_stage1(originals, candidates, repeats=cfg.repeats, seed=cfg.seed, extractor=extractor,
                             weights_path=weights, store=store, resources=cfg.resources_per_trial,
                             concurrency=cfg.concurrency, reference=reference, on_result=on_result, log=say)
    for n in candidates:
        if n not in ran:
            on_result(scores[n])   # finished before a restart: its child run may lack the metrics

    ranking = rank_candidates(scores, cfg.mse_min, cfg.dedupe)
    for row in ranking:
        run_id, _ = tracker.child(row.augmentation, stage=1)
        tracker.log(run_id, metrics={"kept": float(row.kept)},
                    tags={"orbitgen.search.reason": row.reason} if row.reason else None)
        tracker.finish(run_id)
    kept = [r.augmentation for r in ranking if r.kept]
    if cfg.k > len(kept):
        raise SearchConfigError(f"search.k: {cfg.k} is more than the {len(kept)} kept candidates "
                                f"({', '.join(kept) or 'none'}); lower search.k or search.mse_min")
    table = mixture_table(reference, scores, kept)
    t0 = time.perf_counter()
    subsets = rank_subsets(table, kept, cfg.k)
    say(f"ranked {len(subsets)} {cfg.k}-subsets of {len(kept)} kept candidates by mixture FID in "
        f"{time.perf_counter() - t0:.2f}s")
    singles = best_singles(ranking, cfg.k)
    singles_fid, _ = mixture_fid(table, kept, singles)
    best_set, best_set_fid = list(subsets[0].augmentations), subsets[0].fid
    chosen = singles if cfg.select == "singles" else best_set
    reason = (f"stage 1, select={cfg.select}: " + ("the K best singles (published rule)" if cfg.select == "singles"
              else "the K-set whose expanded mixture is closest to the originals")
              + f"; singles {'+'.join(singles)} mixture FID {singles_fid:.4g}, best set {'+'.join(best_set)} "
              f"{best_set_fid:.4g}")

    validation = None
    if cfg.validate_.top_m > 0:
        top = kept[:cfg.validate_.top_m]
        cache: dict[str, list[np.ndarray]] = {}

        def proxy(subset) -> float:
            return mixture_fid(table, kept, list(subset))[0]

        def on_subset(sub) -> None:
            run_id, _ = tracker.child(f"validate:{sub.key}", stage=2)
            if not tracker.has_metric(run_id, "status_finished"):
                metrics = {"status_finished": float(sub.status == "finished")}
                if sub.fid is not None:
                    metrics["fid"] = sub.fid
                if sub.proxy_fid is not None:
                    metrics["proxy_fid"] = sub.proxy_fid
                tracker.log(run_id, params={"augmentations": sub.key, "budget_steps": cfg.validate_.budget_steps},
                            metrics=metrics, tags={"orbitgen.search.status": sub.status},
                            step_metrics=[("fid_step", f, s) for s, f in zip(sub.steps, sub.fids)])
            tracker.finish(run_id, "FINISHED" if sub.status in ("finished", "stopped", "invalid") else "FAILED")

        validation = run_stage2(
            train_fn, top=top, k=cfg.k, trials=cfg.validate_.trials, budget_steps=cfg.validate_.budget_steps,
            seed=cfg.seed, singles=singles, best_set=best_set, stage1_choice=chosen, proxy=proxy, store=store,
            resources=validate_resources or cfg.resources_per_trial, extractor=extractor, weights_path=weights,
            originals_features=originals.features,
            augmented_features=lambda n: cache.setdefault(n, scores[n].features),
            concurrency=cfg.concurrency, on_subset=on_subset, log=say)
        chosen, reason = validation.chosen, f"stage 2: {validation.reason}"
        if validation.warning:
            say("WARNING: " + validation.warning)
        if validation.leaks:
            say("WARNING: leak check: the proxy generator's samples are closer to the augmented copies of "
                f"{', '.join(validation.leaks)} than to the originals")

    _report(tracker, parent, originals, cfg, ranking, subsets, chosen, reason, singles, singles_fid, best_set,
            best_set_fid, validation, store)
    return SearchResult(name, parent, tracker.experiment_id, ranking, subsets, singles, singles_fid, best_set,
                        best_set_fid, chosen, cfg.select, reason, validation, ran,
                        [n for n in candidates if n not in ran])


def _report(tracker: SearchTracker, parent: str, originals: Originals, cfg: SearchConfig, ranking, subsets,
            chosen, reason, singles, singles_fid, best_set, best_set_fid, validation, store: SearchStore) -> None:
    import json

    with tempfile.TemporaryDirectory() as tmp:
        files = {"ranking.csv": write_csv([r.as_csv() for r in ranking], RANKING_COLUMNS),
                 "subsets.csv": write_csv([s.as_csv() for s in subsets], SUBSET_COLUMNS),
                 "summary.json": json.dumps({"chosen": chosen, "select": cfg.select, "reason": reason,
                                             "singles": singles, "singles_fid": singles_fid, "best_set": best_set,
                                             "best_set_fid": best_set_fid, "config": cfg.to_dict(),
                                             "extractor": originals.extractor_name, "images": originals.count,
                                             "validation": validation.summary() if validation else None},
                                            indent=1, default=str)}
        for fname, text in files.items():
            with open(os.path.join(tmp, fname), "w", encoding="utf-8") as f:
                f.write(text)
        fid_bar_chart(ranking, chosen, os.path.join(tmp, "fid_bar.png"))
        few = originals.images[:6]
        contact_sheet(few, [(r.augmentation, apply_uint8(r.augmentation, few, originals.channels,
                                                         repeat_seed(cfg.seed, r.augmentation, 0)))
                            for r in ranking], os.path.join(tmp, "contact_sheet.png"))
        for fname in (*files, "fid_bar.png", "contact_sheet.png"):
            tracker.artifact(parent, os.path.join(tmp, fname))
        for fname in ("ranking.csv", "subsets.csv", "summary.json"):
            store.write_bytes(files[fname].encode("utf-8"), fname)
    metrics = {"singles_mixture_fid": singles_fid, "best_set_mixture_fid": best_set_fid,
               "kept": float(sum(r.kept for r in ranking))}
    if validation and validation.kendall_tau is not None:
        metrics["kendall_tau"] = validation.kendall_tau
    tracker.log(parent, metrics=metrics,
                tags={TAG_CHOSEN: ",".join(chosen), TAG_SELECT: cfg.select, "orbitgen.search.reason": reason[:5000],
                      "orbitgen.search.singles": ",".join(singles), "orbitgen.search.best_set": ",".join(best_set),
                      **({"orbitgen.search.stage": "2", "orbitgen.search.leaks": ",".join(validation.leaks),
                          "orbitgen.search.proxy_warning": validation.warning[:5000]} if validation else
                         {"orbitgen.search.stage": "1"})})
