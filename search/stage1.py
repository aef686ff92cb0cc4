"""Stage 1 on Ray Tune: one trial per candidate, the originals shared through the object store.

Each trial augments every original `repeats` times, extracts features and scores them
(`search.scoring.score_candidate`), then writes its result into the search's folder itself
(`SearchStore`), which is how a restarted search knows what finished: candidates with a result
are not given to Tune again. A driver-side Tune callback hands each finished result to the
caller (MLflow child run, progress line) while the others still run.
"""
from __future__ import annotations

import math
import os
import time
from typing import Callable

import ray
import torch
from ray import tune

from models.metrics.extractors import make_extractor
from search.frechet import Reference
from search.gpu_share import trial_gpu_share
from search.originals import Originals
from search.scoring import CandidateScore, score_candidate
from search.store import SearchStore

OnResult = Callable[[CandidateScore], None]


def _trial(config: dict, payload: tuple) -> None:
    """The Tune trainable: score one candidate, persist it, report its numbers."""
    originals, reference, extractor_name, weights, repeats, seed, storage, resources = payload
    name = config["candidate"]
    torch.set_num_threads(max(1, int(resources["CPU"])))   # as many threads as CPUs reserved, no more
    device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
    # Capped to its GPU share; the cache is emptied after _score returns, its tensors then unreferenced.
    with trial_gpu_share(resources):
        score = _score(name, originals, reference, extractor_name, weights, repeats, seed, device)
    storage.save_score(score)
    tune.report({"candidate": name, "fid": score.fid, "fid_std": score.fid_std, "mse": score.mse,
                 "kid": score.kid, "kid_std": score.kid_std, "seconds": score.seconds})


def _score(name: str, originals: Originals, reference: Reference, extractor_name: str, weights: str | None,
           repeats: int, seed: int, device: str) -> CandidateScore:
    """One candidate's score; the extractor (on the device) lives only inside this call."""
    extractor = make_extractor(extractor_name, weights)
    return score_candidate(name, originals, extractor, repeats, seed, reference, device)


class _Forward(tune.Callback):
    """Runs in the driver: each finished trial's stored result goes to `on_result` at once."""

    def __init__(self, store: SearchStore, on_result: OnResult | None):
        self.store, self.on_result = store, on_result

    def __getstate__(self):
        # Tune pickles its run config (callbacks included) into the experiment folder; the hook is a
        # live closure of this driver (MLflow client, printing) and is not worth restoring.
        return {**self.__dict__, "on_result": None}

    def on_trial_complete(self, iteration, trials, trial, **info):
        name = trial.config["candidate"]
        if self.on_result and self.store.stage1_done(name):
            self.on_result(self.store.load_score(name, features=False))   # a summary: the line and child run


def concurrency_limit(resources: dict[str, float], wanted: int | None) -> int:
    """`wanted`, or as many trials as the connected cluster's CPUs (and GPUs) hold at once."""
    if wanted:
        return wanted
    total = ray.cluster_resources()
    fits = [math.floor(total.get("CPU", 0) / resources["CPU"] + 1e-9)]
    if resources.get("GPU", 0) > 0:
        fits.append(math.floor(total.get("GPU", 0) / resources["GPU"] + 1e-9))
    n = min(fits)
    if n < 1:
        raise ValueError(f"search.resources_per_trial {resources} does not fit the cluster's resources "
                         f"(CPU {total.get('CPU', 0)}, GPU {total.get('GPU', 0)})")
    return n


def run_stage1(originals: Originals, candidates: list[str], *, repeats: int, seed: int, extractor: str,
               weights_path: str | None, store: SearchStore, resources: dict[str, float],
               concurrency: int | None = None, reference: Reference | None = None,
               on_result: OnResult | None = None, log: Callable[[str], None] = lambda s: None,
               with_features: bool = True) -> tuple[dict[str, CandidateScore], list[str]]:
    """Scores of every candidate (finished ones read back, the rest run as Tune trials), and the
    names that ran in this call. `with_features=False`: the scores without their features, which
    stay in the store (`SearchStore.load_features`), so the driver never holds all of them."""
    done = [n for n in candidates if store.stage1_done(n)]
    todo = [n for n in candidates if n not in done]
    if done:
        log(f"stage 1: {len(done)} finished trial(s) found in {store.url}, not rerun: {', '.join(done)}")
    if todo:
        reference = reference or Reference(originals.features)
        limit = concurrency_limit(resources, concurrency)
        log(f"stage 1: {len(todo)} trial(s), up to {limit} at once, {resources} each")
        # The store travels as an object: its fsspec filesystem carries the S3 endpoint, which workers
        # started before it was set would not find in their environment; never credentials (search/store.py).
        payload = (originals, reference, extractor, weights_path, repeats, seed, store, dict(resources))
        # with_parameters puts the payload into Ray's object store once; every trial reads that copy.
        trainable = tune.with_resources(tune.with_parameters(_trial, payload=payload),
                                        {"cpu": resources["CPU"], "gpu": resources.get("GPU", 0.0)})
        path, fs = store.tune_storage()
        tuner = tune.Tuner(
            trainable,
            param_space={"candidate": tune.grid_search(todo)},
            tune_config=tune.TuneConfig(max_concurrent_trials=limit, reuse_actors=True),
            run_config=tune.RunConfig(name=f"stage1-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                                      storage_path=path, storage_filesystem=fs, verbose=0,
                                      callbacks=[_Forward(store, on_result)]),
        )
        grid = tuner.fit()
        failed = [f"{r.config.get('candidate')}: {type(r.error).__name__}: {r.error}" for r in grid if r.error]
        missing = [n for n in todo if not store.stage1_done(n)]
        if failed or missing:
            raise RuntimeError("stage 1 trials failed (rerun with resume to retry only these):\n  "
                               + "\n  ".join(failed or missing))
    return {n: store.load_score(n, features=with_features) for n in candidates}, todo
