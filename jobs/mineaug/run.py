"""Run a spec's MineAug search (`orbitgen search mineaug`): the driver side.

It resolves what the spec names (data, feature extractor, tracking, storage), hands `search`
the function that runs one proxy training on the real loop (`jobs.mineaug.proxy`: search never
imports jobs), and writes the spec back with `augment.mineaug` and `augment.search_run` set, so
the next command is `orbitgen train <that spec>`.
"""
from __future__ import annotations

import os
import textwrap
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from data_shards.storage import join
from jobs.capacity import Demand, PendingTrials, refuse_unfitting, training_demand
from jobs.inputs import check_data, check_files, resolve_data
from jobs.placement import builtin_home, data_location, refuse_unshared, training_places
from jobs.runtime.cleanup import removed_on_bad_input
from jobs.runtime.env import tracking_uri_restored
from jobs.runtime.ray_session import ensure_ray
from jobs.runtime.redact import redact
from jobs.spec import JobSpec, SpecError
from jobs.tracking.runs import TAG_DATA, TAG_FAMILY, TAG_SPEC
from jobs.tracking.store_check import check_answers
from search.config import stage1_features


@dataclass
class SearchJobResult:
    result: Any            # search.run.SearchResult
    spec_path: Path        # the written spec, ready for `orbitgen train`
    tracking_uri: str


def search_storage(spec: JobSpec, name: str) -> str:
    """The search's folder: under checkpoint.storage, else the storage root, when the spec or the
    environment sets one (a cluster's trials must all reach it), else under the workdir."""
    shared = spec.checkpoint.storage or spec.storage_root()
    if shared:
        return join(shared, "search", name)
    return str(spec.workdir_path() / "search" / name)


def written_spec(spec: JobSpec, chosen: list[str], parent_run_id: str) -> str:
    """The input spec (as validated, overrides applied) with the search's choice filled in."""
    raw = spec.model_dump(mode="json")
    raw["augment"] = {**raw["augment"], "mineaug": list(chosen), "search_run": parent_run_id}
    return yaml.safe_dump(raw, sort_keys=False)


def spec_header(name: str, parent_run_id: str, verdict: str = "", rule: str = "") -> str:
    """The comment lines above a written spec: where it came from and, after stage 2, its verdict
    (when no subset beat plain data, the reader of the spec learns it here, not from the run only)."""
    lines = [f"# Written by `orbitgen search mineaug` (search {name}, MLflow run {parent_run_id})."]
    if rule:   # which rule produced augment.mineaug (search.labels)
        wrapped = textwrap.wrap(rule, 96)
        lines += ["# Chosen by: " + wrapped[0], *("#   " + line for line in wrapped[1:])]
    if verdict:
        wrapped = textwrap.wrap(verdict, 96)
        lines += ["# Verdict: " + wrapped[0], *("#   " + line for line in wrapped[1:])]
    return "\n".join(lines) + "\n"


def run_search_job(spec: JobSpec, *, say: Callable[[str], None] = print, resume: str | None = None,
                   out: str | None = None) -> SearchJobResult:
    """Search `spec`'s augmentations; with `resume` (a search name), continue that search."""
    from search.run import run_search   # imports Ray Tune: only when searching

    family = spec.make_family()
    if family.conditional:
        raise SpecError(f"family: {spec.family} is conditional; MineAug searches augmentations of unconditional "
                        "image sets (stylegan2, dcgan, diffusion with conditioning none)")
    cfg = spec.search
    # search.features / search.preset=paper without Inception's weights file: one line, before Ray starts.
    stage1_features(cfg, spec.eval.fid_extractor, spec.eval.inception_weights)
    local = spec.model_copy(update={"workdir": str(spec.workdir_path())})
    tracking_uri = local.tracking_uri()
    name = resume or f"{spec.name}-search-{uuid.uuid4().hex[:8]}"
    storage = search_storage(local, name)
    with removed_on_bad_input(local.workdir_path()):   # bad input leaves no built-in shards behind
        check_answers(tracking_uri, "tracking.uri" if spec.tracking.uri else "MLFLOW_TRACKING_URI")
        cluster = ensure_ray()
        home = builtin_home(local, cluster)
        refuse_unshared(cluster, training_places(spec, data_url=data_location(spec, home), tracking_uri=tracking_uri,
                                                 storage=storage), spec.storage.shared_mounts)
        check_files(local, family_files=bool(cfg.validate_.top_m))   # only stage 2 trains the family
        refuse_unfitting(Demand("search trials", 1, cfg.resources_per_trial, keys="search.resources_per_trial"),
                         cluster)
        if cfg.validate_.top_m:   # a stage-2 trial is one proxy training with the spec's scaling
            refuse_unfitting(Demand("stage-2 trials", 1, training_demand(spec).bundle), cluster)
        data_url = resolve_data(local, home)
        card = check_data(local, data_url)
    say(f"data      {data_url} ({card['count']} images, fingerprint {card['fingerprint'][:12]})")
    say(f"search    {name} · storage {storage} · mlflow {redact(tracking_uri)}")

    train_fn = None
    if cfg.validate_.top_m:
        from jobs.mineaug.proxy import make_proxy_train_fn

        train_fn = make_proxy_train_fn(local, data_url, say=say)
    # Tune's console box and TensorBoard hint say nothing the search's own progress lines don't.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    with tracking_uri_restored(), PendingTrials("search trials", say):
        result = run_search(
            data_url, channels=spec.data.channels, resolution=spec.data.resolution, config=cfg,
            tracking_uri=tracking_uri, experiment=spec.experiment, name=name, storage=storage,
            extractor=spec.eval.fid_extractor, extractor_weights=spec.eval.inception_weights,
            resume=resume is not None, train_fn=train_fn, progress=say, holdout=spec.data.holdout,
            parent_tags={TAG_FAMILY: spec.family, TAG_DATA: card["fingerprint"], TAG_SPEC: spec.sha()},
            validate_resources={"CPU": spec.scaling.cpus_per_worker, "GPU": 1.0 if spec.scaling.use_gpu else 0.0},
        )
    path = Path(out) if out else spec.workdir_path() / "search" / name / "spec.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(spec_header(name, result.parent_run_id, result.verdict, result.chosen_rule)
                    + written_spec(spec, result.chosen, result.parent_run_id))
    return SearchJobResult(result=result, spec_path=path, tracking_uri=tracking_uri)
