"""Evaluate a model after its training: `orbitgen eval`, and `models promote --reevaluate`.

The model is a registered version (`models:/NAME@ALIAS`, `models:/NAME/VERSION`), a training
run's logged generator (`runs:/RUN_ID`) or a local snapshot file (a checkpoint's `generator.pt`,
or the checkpoint folder). What is not given comes from the spec the model was trained with
(stored beside the registered generator; for a checkpoint, the spec of the run it names):
the data (`data.train`), metrics, sample count, extractor and its weights, held-out split. With
`like`, the evaluation follows another's protocol instead (its split, seeds, sample count and
extractors), and refuses when it cannot reproduce it here (other data, other extractor weights).

The values go to an MLflow *evaluation run* in the model's experiment, tagged with the model it
evaluated and its protocol, and, for a registered version, onto the version as protocol-keyed
tags (`jobs.tracking.protocol`), where `promote` compares them.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from data_shards.card import read_card
from data_shards.errors import InputNotFound, UserError
from jobs.eval.core import EvalSettings, split_holdout
from jobs.eval.distributed import evaluate_distributed
from jobs.runtime.env import tracking_uri_restored
from jobs.runtime.redact import redact
from jobs.spec import EvalSpec, JobSpec, parse_spec
from jobs.tracking import runs as tracking
from jobs.tracking.model_refs import resolve_ref
from jobs.tracking.protocol import (TAG_EVAL_OF, TAG_MODEL_NAME, TAG_MODEL_VERSION, TAG_RUN_PROTOCOL, EvalProtocol,
                                    tag_version)
from jobs.tracking.store_check import check_answers, local_store_path, require_store
from models.family import Family
from models.metrics.extractors import InceptionExtractor, RandConvExtractor, VGG16Extractor
from models.metrics.suite import named_for_weights
from models.snapshot import SNAPSHOT, load_snapshot

EVAL_EXPERIMENT = "orbitgen-eval"   # the experiment of evaluations of snapshots no tracked run made
FID_EXTRACTORS = {RandConvExtractor.name: "randconv", InceptionExtractor.name: "inception"}
LPIPS_PREFIX = "lpips-"   # published LPIPS in a protocol: `lpips-<backbone>/<hash of its weights file>`


@dataclass
class EvalResult:
    protocol: EvalProtocol
    scores: dict[str, float]
    run_id: str | None            # the evaluation run (None when not logged)
    model_name: str | None        # set when the model is a registered version
    model_version: str | None


@dataclass(frozen=True)
class _Model:
    ref: str
    snapshot: Path
    spec: JobSpec | None          # the spec it was trained with, when known
    run_id: str | None            # the training run, when the store has it
    name: str | None = None
    version: str | None = None


def evaluate_model(model: str, *, tracking_uri: str, data_url: str | None = None,
                   metrics: Sequence[str] | None = None, num_samples: int | None = None,
                   workers: int = 1, like: EvalProtocol | None = None, log: bool = True,
                   gpus_per_worker: float | None = None) -> EvalResult:
    """Evaluates `model` on `workers` Ray workers (see the module's docstring); bad input raises
    UserError. `gpus_per_worker`: each worker's GPUs (refused up front where the cluster never holds
    them); None: an equal share of the cluster's GPUs, at most one, none without. With `like`, its protocol sets the split, seeds, sample count and extractors
    (`num_samples` is not used). Ray is started locally unless it runs (or RAY_ADDRESS names a
    cluster). `log=False`: nothing is written to MLflow (`run_id` is None)."""
    if workers < 1:
        raise UserError(f"--workers must be 1 or more, not {workers}")
    with tempfile.TemporaryDirectory() as tmp, tracking_uri_restored():
        m = _resolve(model, tracking_uri, Path(tmp))
        family, _, _ = load_snapshot(m.snapshot)
        given_data = data_url is not None
        data_url = _given_data(m, data_url) if given_data else _training_data(m)
        _check_data(family, data_url)
        settings = _settings(family, m.spec, metrics, num_samples, like)
        protocol = _protocol(family, data_url, settings)
        if like is not None and like != protocol:
            raise UserError(f"cannot evaluate {model} under the given protocol here: "
                            + "; ".join(_explain(d, data_url) for d in like.differences(protocol)))
        from jobs.eval.resources import refuse_gpu_ask
        from jobs.placement import Place, refuse_unshared
        from jobs.runtime.ray_session import ensure_ray

        cluster = ensure_ray()
        refuse_gpu_ask(gpus_per_worker or 0.0, workers, cluster, "evaluation workers")
        # The workers read the data themselves: on a cluster, from where every node reaches.
        refuse_unshared(cluster, [Place("--data" if given_data else "data.train", data_url)],
                        m.spec.storage.shared_mounts if m.spec else ())
        scores, params, _ = evaluate_distributed(m.snapshot, data_url, settings, workers=workers,
                                                 gpus_per_worker=gpus_per_worker)
    run_id = _log(tracking_uri, m, family, data_url, protocol, scores, params) if log else None
    return EvalResult(protocol, scores, run_id, m.name, m.version)


def _resolve(model: str, tracking_uri: str, dest: Path) -> _Model:
    """The model's snapshot on this disk, its spec, run and registered version."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if not model.startswith(("models:/", "runs:/")):
        return _local(model, tracking_uri, dest)
    require_store(tracking_uri, "--tracking-uri")
    client = MlflowClient(tracking_uri)
    name = version = None
    if model.startswith("models:/"):
        from jobs.tracking.versions import version_of_ref

        v = version_of_ref(client, model)
        name, version, run_id = v.name, str(v.version), v.run_id
        ref = f"models:/{name}/{version}"
    else:
        run_id, _, path = model.removeprefix("runs:/").partition("/")
        try:
            client.get_run(run_id)
        except MlflowException:
            raise UserError(f"no run {run_id!r} in the store at {redact(tracking_uri)} (MODEL runs:/RUN_ID)") from None
        ref = f"runs:/{run_id}/{path or 'generator'}"
    try:
        snapshot = resolve_ref(ref, dest, tracking_uri)
    except (OSError, MlflowException) as e:
        raise UserError(f"{model}: no orbitgen generator there: {str(e).strip().splitlines()[0]}") from None
    spec_file = Path(snapshot).parent / "spec.yaml"   # logged beside the snapshot (registry.log_generator)
    return _Model(model, Path(snapshot), _spec(spec_file, model), run_id, name, version)


def _local(path: str, tracking_uri: str, dest: Path) -> _Model:
    """A snapshot file or checkpoint folder; its spec is the spec of the run its checkpoint names."""
    from mlflow.exceptions import MlflowException

    snapshot = Path(path).expanduser()
    snapshot = snapshot / SNAPSHOT if snapshot.is_dir() else snapshot
    if not snapshot.is_file():
        raise InputNotFound(f"MODEL {path}: no snapshot file there (a checkpoint folder or its {SNAPSHOT})")
    try:
        _, _, extra = load_snapshot(snapshot)
    except ValueError as e:
        raise UserError(f"MODEL {path}: {e}") from None
    run_id = extra.get("mlflow_run_id")
    store = local_store_path(tracking_uri)
    if not run_id or (store is not None and not store.exists()):
        return _Model(path, snapshot.absolute(), None, None)
    import mlflow.artifacts

    check_answers(tracking_uri, "--tracking-uri")
    try:
        spec_file = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="spec.yaml", dst_path=str(dest),
                                                        tracking_uri=tracking_uri)
    except (OSError, MlflowException):   # a run of another store
        return _Model(path, snapshot.absolute(), None, None)
    return _Model(path, snapshot.absolute(), _spec(Path(spec_file), path), run_id)


def _spec(path: Path, model: str) -> JobSpec | None:
    return parse_spec(path.read_text(), source=f"the spec of {model}") if path.is_file() else None


def _training_data(m: _Model) -> str:
    if m.spec is None:
        raise UserError(f"{m.ref} carries no training spec to take the data from: give --data URL")
    from jobs.inputs import resolve_data
    from jobs.placement import builtin_home
    from jobs.runtime.ray_session import ensure_ray

    return resolve_data(m.spec, builtin_home(m.spec, ensure_ray()))


def _given_data(m: _Model, data_url: str) -> str:
    """`--data` as the workers read it: shards made elsewhere (a brace URL, a folder of plain tars)
    are adopted on first use, their card written beside them or under the model's storage."""
    from jobs.inputs import resolve_data_url
    from jobs.placement import builtin_home
    from jobs.runtime.ray_session import ensure_ray
    from jobs.spec import JobSpec

    home = (builtin_home(m.spec, ensure_ray()) if m.spec
            else str(Path(JobSpec.model_fields["workdir"].default) / "shards"))
    resize_to = m.spec.data.resolution if m.spec and m.spec.data.resize == "resize" else None
    return resolve_data_url(data_url, home=home, resize_to=resize_to)


def _check_data(family: Family, data_url: str) -> None:
    card = read_card(data_url)
    if (card.resolution, card.channels) != (family.resolution, family.channels):
        raise UserError(f"--data {data_url} holds {card.channels}-channel {card.resolution}² images; the model makes "
                        f"{family.channels}-channel {family.resolution}² ones")
    missing = [k for k in family.data_keys if k not in card.modalities]
    if missing:
        raise UserError(f"--data {data_url} has no {', '.join(missing)} (it holds {', '.join(card.modalities)}); "
                        f"a {family.name} model is evaluated on {', '.join(family.data_keys)}")


def _settings(family: Family, spec: JobSpec | None, metrics: Sequence[str] | None, num_samples: int | None,
              like: EvalProtocol | None) -> EvalSettings:
    """What to compute: the arguments, else `like`'s protocol, else the model's spec, else the defaults."""
    if spec is not None:
        settings = EvalSettings.from_spec(spec, family)
    else:
        ev = EvalSpec()
        settings = EvalSettings(num_samples=ev.num_samples, metrics=tuple(family.metrics), extractor=ev.fid_extractor)
    if metrics:
        settings = replace(settings, metrics=_family_names(family, metrics, settings.lpips_weights))
    if num_samples is not None:
        settings = replace(settings, num_samples=num_samples)
    if like is not None:
        settings = _like(settings, like)
    if settings.num_samples < 2:
        raise UserError(f"--num-samples must be 2 or more (two sets of features are compared), not {settings.num_samples}")
    return settings


def _family_names(family: Family, metrics: Sequence[str], lpips_weights: str | None) -> tuple[str, ...]:
    """--metrics as the family's names: `perceptual_randconv` is what a family's `lpips` is without
    LPIPS weights, so it is read as `lpips` (computed and logged as perceptual_randconv); with the
    weights (the spec's eval.lpips_weights) it would be published LPIPS, so it is refused, as the spec refuses it."""
    if lpips_weights and "perceptual_randconv" in metrics and "lpips" in family.metrics:
        raise UserError("--metrics perceptual_randconv: this model's spec gives LPIPS weights (eval.lpips_weights), "
                        "so its perceptual metric is published LPIPS: ask for lpips")
    named = tuple(dict.fromkeys("lpips" if m == "perceptual_randconv" and "lpips" in family.metrics else m
                                for m in metrics))
    unknown = [m for m in named if m not in family.metrics]
    if unknown:
        known = named_for_weights(family.metrics, lpips_weights)
        raise UserError(f"--metrics: {', '.join(unknown)} — a {family.name} model is judged by {', '.join(known)}")
    return named


def _like(settings: EvalSettings, like: EvalProtocol) -> EvalSettings:
    """`settings` under the protocol `like`: its split, seeds, sample count and extractors."""
    lpips = [e for e in like.extractors if e.startswith(LPIPS_PREFIX)]   # lpips-alex/<hash of its file>
    unknown = [e for e in like.extractors if e not in FID_EXTRACTORS and e != VGG16Extractor.name and e not in lpips]
    if unknown:
        raise UserError(f"the protocol's extractor {', '.join(unknown)} is not one orbitgen has "
                        f"({', '.join([*FID_EXTRACTORS, VGG16Extractor.name, LPIPS_PREFIX + '…'])})")
    fid = [FID_EXTRACTORS[e] for e in like.extractors if e in FID_EXTRACTORS]
    return replace(settings, num_samples=like.num_samples, extractor=fid[0] if fid else settings.extractor,
                   vgg_weights=settings.vgg_weights if VGG16Extractor.name in like.extractors else None,
                   lpips_weights=settings.lpips_weights if lpips else None,
                   holdout=split_holdout(like.split), real_seed=like.real_seed, seed_base=like.seed_base)


def _protocol(family: Family, data_url: str, s: EvalSettings) -> EvalProtocol:
    try:
        return s.protocol(family, data_url)
    except FileNotFoundError as e:   # an extractor's weights file (the message says which spec key)
        raise UserError(str(e)) from None



def _explain(difference: str, data_url: str) -> str:
    if difference.startswith("data_fingerprint:"):
        return f"the data at {data_url} is another data set ({difference}): give --data the protocol's data"
    if difference.startswith("extractors:"):
        return f"the feature extractors differ (protocol vs here: {difference.removeprefix('extractors: ')})"
    return difference


def _log(tracking_uri: str, m: _Model, family: Family, data_url: str, protocol: EvalProtocol,
         scores: dict[str, float], params: dict[str, str]) -> str:
    """The evaluation run (in the model's experiment), and the version's tags when it is registered."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    check_answers(tracking_uri, "--tracking-uri")
    client = MlflowClient(tracking_uri)
    if m.run_id is not None:
        experiment_id = client.get_run(m.run_id).info.experiment_id
    else:
        exp = client.get_experiment_by_name(EVAL_EXPERIMENT)
        experiment_id = exp.experiment_id if exp else client.create_experiment(EVAL_EXPERIMENT)
    tags = {TAG_EVAL_OF: m.ref, TAG_RUN_PROTOCOL: protocol.to_json(), tracking.TAG_FAMILY: family.name,
            tracking.TAG_DATA: protocol.data_fingerprint}
    tags |= {TAG_MODEL_NAME: m.name, TAG_MODEL_VERSION: m.version} if m.name else {}
    label = f"{m.name}-v{m.version}" if m.name else family.name
    run = client.create_run(experiment_id, run_name=f"eval-{label}-{protocol.key()}", tags=tags)
    run_id = run.info.run_id
    ts = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), ts, 0) for k, v in scores.items()],
                     params=[Param(k, v) for k, v in {**params, "eval_data": redact(data_url)}.items()])
    client.set_terminated(run_id)
    if m.name is not None:
        tag_version(client, m.name, m.version, protocol, scores, run_id)
    return run_id
