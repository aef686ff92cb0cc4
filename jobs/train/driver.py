"""Run one job spec: resolve data, open the MLflow run, train on Ray, register and promote.

This is the driver side; `jobs/train/loop.py` is what each Ray Train worker runs.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import mlflow
from mlflow.tracking import MlflowClient

from data_shards.environ import environ_set
from data_shards.storage import join, ray_storage
from jobs.capacity import WAIT_REPORT_S, Pending, refuse_unfitting, training_demand
from jobs.eval import weights as eval_weights
from jobs.eval.core import EvalSettings
from jobs.inputs import check_data, check_files, resolve_data
from jobs.placement import (artifact_place, builtin_home, data_location, local_path, refuse_unshared,
                            training_places)
from jobs.runtime.cleanup import removed_on_bad_input
from jobs.runtime.env import forwarded_env, git_dirty, git_sha, tracking_uri_restored
from jobs.runtime.ray_session import ensure_ray, one_node_settings
from jobs.runtime.redact import redact, redact_values
from jobs.spec import JobSpec
from jobs.tracking import buffered, lineage, model_refs, registry, runs as tracking
from jobs.tracking.protocol import TAG_RUN_PROTOCOL, tag_version
from jobs.tracking.store_check import check_answers
from jobs.train.config import WorkerConfig
from jobs.train.progress import ProgressBar
from jobs.train.resume import ResumeError, read_run_info, write_run_info
from models.snapshot import SNAPSHOT


@dataclass
class JobResult:
    run_id: str
    experiment_id: str
    tracking_uri: str
    data_url: str
    storage: str
    checkpoint: str | None
    metrics: dict[str, Any]
    run_name: str = ""
    model_version: str | None = None
    promotion: registry.Promotion | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def make_trainer(spec: JobSpec, run_name: str, storage: str, loop_config: dict[str, Any]):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.train.entry import train_loop_per_worker

    storage_path, storage_fs = ray_storage(storage)
    best = spec.checkpoint.best_metric
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=spec.scaling.num_workers, use_gpu=spec.scaling.use_gpu,
                                     resources_per_worker={"CPU": spec.scaling.cpus_per_worker},
                                     placement_strategy=spec.scaling.placement_strategy),
        # The collective timeout ends a step that waits on a hung peer (NCCL would wait forever);
        # evaluation happens outside collectives (see worker._report), so it needs no margin.
        torch_config=TorchConfig(backend="nccl" if spec.scaling.use_gpu else "gloo", timeout_s=spec.strategy.timeout_s),
        # Same storage path and name as an earlier run: Ray continues it from its latest checkpoint.
        run_config=RunConfig(name=run_name, storage_path=storage_path, storage_filesystem=storage_fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep,
                                                                checkpoint_score_attribute=best,
                                                                checkpoint_score_order=spec.checkpoint.best_mode),
                             failure_config=FailureConfig(max_failures=spec.checkpoint.max_failures)),
    )


def pinned(spec: JobSpec) -> JobSpec:
    """`spec` with what the driver's machine decides written in: workers may run elsewhere, with
    another working directory and other variables."""
    return spec.model_copy(update={"workdir": str(spec.workdir_path()),
                                   "storage": spec.storage.model_copy(update={"root": spec.storage_root()})})


def _resumed_run(tracking_uri: str, storage: str, resume: str) -> dict[str, Any]:
    """What the stopped run `resume` wrote at its start; ResumeError when it cannot be continued here."""
    info = read_run_info(storage, resume)
    # The file holds the URI redacted (no password at rest): a password alone cannot tell two stores apart.
    if redact(info["tracking_uri"]) != redact(tracking_uri):
        raise ResumeError(f"run {resume} was tracked at {redact(info['tracking_uri'])}, this spec tracks at "
                          f"{redact(tracking_uri)} "
                          f"(set tracking.uri to resume it)")
    return info


def _experiment_id(spec: JobSpec, tracking_uri: str) -> str:
    return tracking.ensure_experiment(tracking_uri, spec.experiment, spec.workdir_path() / "mlartifacts")


def _open_run(spec: JobSpec, tracking_uri: str, resumed: dict[str, Any] | None, experiment_id: str | None = None):
    """The MLflow run to log into: a new one, or, on resume, the one the stopped run logged into."""
    if resumed is None:
        return mlflow.start_run(experiment_id=experiment_id or _experiment_id(spec, tracking_uri))
    mlflow.set_tracking_uri(tracking_uri)
    run_id = resumed["mlflow_run_id"]
    # MLflow refuses to reopen a run outside the process's active experiment (a notebook's, an
    # earlier job's in this process): make the run's own experiment the active one.
    mlflow.set_experiment(experiment_id=MlflowClient(tracking_uri).get_run(run_id).info.experiment_id)
    return mlflow.start_run(run_id=run_id)


def _registered_scores(spec: JobSpec, result, checkpoint) -> dict[str, float]:
    """The evaluation values of the checkpoint that was registered (the best one, or the last)."""
    values = next((m for c, m in result.best_checkpoints or [] if c.path == checkpoint.path), None)
    values = dict(result.metrics or {}) if values is None else values
    return {k: float(values[k]) for k in spec.reported_metrics(spec.make_family()) if k in values}


def run_job(spec: JobSpec, say: Callable[[str], None] = print, resume: str | None = None) -> JobResult:
    """Train `spec`; with `resume` (a run name under the spec's checkpoint storage), continue that
    run from its latest checkpoint, logging into the same MLflow run."""
    with tracking_uri_restored():
        return _run_job(spec, say, resume)


def _run_job(spec: JobSpec, say: Callable[[str], None], resume: str | None) -> JobResult:
    started = time.perf_counter()
    spec = pinned(spec)
    tracking_uri = spec.tracking_uri()
    storage = spec.storage_url()
    # Every input is checked before an MLflow run exists; what the checks built goes on failure.
    with removed_on_bad_input(spec.workdir_path()):
        check_answers(tracking_uri, "tracking.uri" if spec.tracking.uri else "MLFLOW_TRACKING_URI")
        resumed = _resumed_run(tracking_uri, storage, resume) if resume else None
        refs = lineage.given_refs(spec.model)   # as given: resolution makes them local paths
        spec = model_refs.resolve_model_refs(spec, spec.workdir_path() / "model-refs")
        cluster = ensure_ray()
        home = builtin_home(spec, cluster)
        refuse_unshared(cluster, training_places(spec, data_url=data_location(spec, home), tracking_uri=tracking_uri),
                        spec.storage.shared_mounts)
        experiment_id = None   # made here only where its artifact location is checked
        if resumed is None and cluster.spans_machines and local_path(tracking_uri) is None:
            # Rank 0 writes the run's artifacts to the experiment's location itself.
            experiment_id = _experiment_id(spec, tracking_uri)
            refuse_unshared(cluster, [artifact_place(tracking_uri, experiment_id)], spec.storage.shared_mounts)
        check_files(spec)
        demand = training_demand(spec)
        refuse_unfitting(demand, cluster)
        data_url = resolve_data(spec, home)
        card = check_data(spec, data_url)
    say(f"data      {data_url} ({card['count']} images, fingerprint {card['fingerprint'][:12]})")

    with _open_run(spec, tracking_uri, resumed, experiment_id) as run:
        run_id, experiment_id = run.info.run_id, run.info.experiment_id
        run_name = resume or f"{spec.name}-{run_id[:8]}"
        if resume is None:
            mlflow.set_tags({tracking.TAG_FAMILY: spec.family, tracking.TAG_DATA: card["fingerprint"],
                             tracking.TAG_GIT: git_sha() or "unknown", lineage.TAG_GIT_DIRTY: git_dirty(),
                             tracking.TAG_SPEC: spec.sha(), **lineage.built_on_tag(refs, tracking_uri)})
            if spec.augment.search_run:
                mlflow.set_tag(tracking.TAG_SEARCH, spec.augment.search_run)
            # The search section configures `orbitgen search`, not this training: not a param of the run.
            mlflow.log_params(redact_values(tracking.flatten(spec.model_dump(mode="json", exclude={"search"}))))
            tracking.log_dataset(data_url, card)
            write_run_info(storage, run_name, {"mlflow_run_id": run_id, "tracking_uri": tracking_uri,
                                               "experiment": spec.experiment, "spec_sha": spec.sha()})
        else:
            # Params are immutable in MLflow: a resumed run keeps its first ones; spec.yaml shows the current spec.
            mlflow.set_tag(tracking.TAG_SPEC, spec.sha())
        mlflow.log_text(redact(spec.to_yaml()), "spec.yaml")
        say(f"mlflow    {redact(tracking_uri)} · experiment {spec.experiment} · run {run_id}")

        say(f"{'resuming' if resume else 'training'}  {spec.family} · {spec.total_steps} steps · "
            f"{spec.scaling.num_workers} workers ({spec.strategy.kind}) · run {run_name} · "
            f"checkpoints under {join(storage, run_name)}")
        bar = ProgressBar(run_name, spec.total_steps, waiting=Pending(demand).line, waiting_every_s=WAIT_REPORT_S)
        try:
            worker = WorkerConfig(spec=spec.model_dump(mode="json"), run_id=run_id, tracking_uri=tracking_uri,
                                  data_url=data_url, env=forwarded_env(),
                                  # with the extractors' weights: every rank evaluates (jobs/eval/spread.py)
                                  model_files=model_refs.ship(spec) | eval_weights.ship(spec.eval.weight_files()),
                                  progress_board=bar.name)
            with environ_set(one_node_settings()):   # Ray Train hands these on to its controller
                result = make_trainer(spec, run_name, storage, worker.as_loop_config()).fit()
        finally:
            bar.close()
        metrics = dict(result.metrics or {})
        checkpoint = result.checkpoint
        if spec.checkpoint.best_metric and result.best_checkpoints:
            checkpoint = result.get_best_checkpoint(spec.checkpoint.best_metric, spec.checkpoint.best_mode) or checkpoint
        # The server may have gone away during training: first what the workers left for it in the
        # run's storage, then tag, register, promote and end the run, all waiting for the server
        # within one bound (jobs/tracking/buffered.py); what it never took is said at the end.
        later = buffered.Unfinished()
        with later.step("deliver the metrics it missed"):
            buffered.replay(MlflowClient(tracking_uri), run_id, join(storage, run_name))
        with later.step("tag the checkpoint"):
            buffered.retried(mlflow.set_tag, "orbitgen.checkpoint", checkpoint.path if checkpoint else "")

        out = JobResult(run_id=run_id, experiment_id=experiment_id, tracking_uri=tracking_uri, data_url=data_url,
                        storage=join(storage, run_name), checkpoint=checkpoint.path if checkpoint else None,
                        metrics=metrics, run_name=run_name)
        if checkpoint is not None:
            # What the run's values were measured under (jobs/tracking/protocol.py), on the run and the version.
            family = spec.make_family()
            protocol = EvalSettings.from_spec(spec, family).protocol(family, data_url)
            with later.step("tag the evaluation protocol"):
                buffered.retried(mlflow.set_tag, TAG_RUN_PROTOCOL, protocol.to_json())
            version = None
            with later.step("register the model"), checkpoint.as_directory() as d, tempfile.TemporaryDirectory() as tmp:
                spec_file = Path(tmp) / "spec.yaml"
                spec_file.write_text(redact(spec.to_yaml()))
                version = registry.log_generator(Path(d) / SNAPSHOT, spec_file, spec.tracking.registry_model)
            out.model_version = version
            if version is not None:
                with later.step(f"tag v{version} with its scores"):
                    buffered.retried(tag_version, MlflowClient(tracking_uri), spec.tracking.registry_model, version,
                                     protocol, _registered_scores(spec, result, checkpoint), run_id)
                with later.step(f"promote v{version}"):
                    out.promotion = buffered.retried(registry.promote, spec.tracking.registry_model,
                                                     metric=spec.tracking.promote_metric,
                                                     mode=spec.tracking.promote_mode, candidate=version)
                    say(f"registry  {spec.tracking.registry_model} v{version}: {out.promotion.reason}")
        with later.step(buffered.END):
            buffered.retried(MlflowClient(tracking_uri).set_terminated, run_id, "FINISHED")
        if later:
            # The training is done and kept, its tracking is not: say so, and what to run when the server is back.
            buffered.let_go_of_run()
            out.extra["tracking_unfinished"] = later.message(redact(tracking_uri), out.storage, out.checkpoint, run_name)
            say(out.extra["tracking_unfinished"])
    out.seconds = time.perf_counter() - started
    return out
